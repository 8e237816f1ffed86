"""The diagnostics a fit keeps: ``FitResult.diagnostics``, as objects and as JSON-safe data.

``Fitter.covariance()``, ``bootstrap()`` and ``profile()`` keep what they return in
``fitter.result.diagnostics`` (held by the result's history, so a resumed fit keeps it and a
new fit starts without): ``"covariance"`` -> :class:`Covariance`, ``"bootstrap"`` ->
:class:`BootstrapResult` (also the refits of an interrupted one), ``"profile"`` -> ``{flat
name: DataFrame}`` (the profiles of later calls are merged in). ``FitResult.to_dict()`` writes
them with :func:`diagnostics_to_json` and ``FitResult.from_dict()`` reads them back with
:func:`diagnostics_from_json`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chemfit.fitting.jsonl import float_from_json, json_float, to_jsonable

__all__ = ["diagnostics_from_json", "diagnostics_to_json", "keep"]


def keep(fitter: Any, key: str, value: Any) -> None:
    """Keep ``value`` as ``fitter.result.diagnostics[key]`` (profiles are merged by name).

    Examples
    --------
    >>> from chemfit.fitting.fitter import Fitter
    >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0})
    >>> _ = fitter.fit_scipy()
    >>> keep(fitter, "profile", {"x": "curve of x"})
    >>> fitter.result.diagnostics
    {'profile': {'x': 'curve of x'}}
    """
    result = getattr(fitter, "result", None)
    if result is None:
        return
    diagnostics = result.history.diagnostics
    if key == "profile":
        diagnostics["profile"] = {**diagnostics.get("profile", {}), **value}
    else:
        diagnostics[key] = value


def _profile_to_json(frame: Any) -> dict:
    return {
        "value": [json_float(v) for v in frame["value"]],
        "loss": [json_float(v) for v in frame["loss"]],
        "attrs": to_jsonable(frame.attrs),
    }


def _profile_from_json(data: Mapping[str, Any]) -> Any:
    import pandas

    frame = pandas.DataFrame(
        {
            "value": [float_from_json(v) for v in data["value"]],
            "loss": [float_from_json(v) for v in data["loss"]],
        },
        dtype=float,
    )
    frame.attrs.update({k: float_from_json(v) for k, v in data.get("attrs", {}).items()})
    return frame


def diagnostics_to_json(diagnostics: Mapping[str, Any]) -> dict:
    """JSON-safe data of ``FitResult.diagnostics`` (other keys through ``to_jsonable``).

    Examples
    --------
    >>> import json, pandas
    >>> curve = pandas.DataFrame({"value": [0.5, 1.0], "loss": [0.25, float("nan")]})
    >>> data = diagnostics_to_json({"profile": {"x": curve}})
    >>> json.dumps(data, allow_nan=False)
    '{"profile": {"x": {"value": [0.5, 1.0], "loss": [0.25, "nan"], "attrs": {}}}}'
    >>> diagnostics_from_json(json.loads(json.dumps(data)))["profile"]["x"].equals(curve)
    True
    """
    data: dict[str, Any] = {}
    for key, value in diagnostics.items():
        if key == "profile":
            data[key] = {name: _profile_to_json(frame) for name, frame in value.items()}
        elif hasattr(value, "to_dict") and key in ("covariance", "bootstrap"):
            data[key] = value.to_dict()
        else:
            data[key] = to_jsonable(value)
    return data


def diagnostics_from_json(data: Mapping[str, Any] | None) -> dict:
    """The objects of :func:`diagnostics_to_json` output (``None`` gives ``{}``)."""
    if not data:
        return {}
    diagnostics: dict[str, Any] = {}
    for key, value in data.items():
        if key == "covariance":
            from chemfit.fitting.diagnostics.covariance import Covariance

            diagnostics[key] = Covariance.from_dict(value)
        elif key == "bootstrap":
            from chemfit.fitting.diagnostics.bootstrap import BootstrapResult

            diagnostics[key] = BootstrapResult.from_dict(value)
        elif key == "profile":
            diagnostics[key] = {name: _profile_from_json(v) for name, v in value.items()}
        else:
            diagnostics[key] = value
    return diagnostics
