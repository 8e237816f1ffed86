"""Callbacks for the Fitter (contract path; defined in :mod:`chemfit.fitting.callbacks`)."""

from chemfit.fitting.callbacks import (
    CheckpointBestParameters,
    JSONLinesHistory,
    NumpyEncoder,
    SaveMetaData,
    load_observations,
    log_progress,
)

__all__ = [
    "CheckpointBestParameters",
    "JSONLinesHistory",
    "NumpyEncoder",
    "SaveMetaData",
    "load_observations",
    "log_progress",
]
