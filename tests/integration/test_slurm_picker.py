"""The executor picker's "Slurm engines" and "Dask on Slurm" against the real Slurm (issue 16):
the job's state while the engines register, the job in the running status, nothing left after
Shut down, and an ``sbatch`` refusal in plain words."""

from __future__ import annotations

import sys

import pytest

from tests.helpers.slurm import require_slurm, slurm_step_processes, wait_no_jobs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="Slurm: Linux only"),
]


@pytest.fixture
def picker_factory():
    require_slurm()
    pytest.importorskip("ipywidgets")
    from chemfit_widgets import ExecutorPicker

    made = []

    def make(**kwargs):
        picker = ExecutorPicker(**kwargs)
        made.append(picker)
        return picker

    yield make
    for picker in made:
        picker.close()
    assert wait_no_jobs(15) == []
    assert slurm_step_processes() == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("kind", "noun"), [("slurm", "engines"), ("dask-slurm", "workers")])
def test_the_picker_shows_the_job_while_it_starts_and_stops_it(picker_factory, kind, noun):
    picker = picker_factory(kind=kind, engines=2, partition="debug", time_limit="10")
    messages = []
    picker.observe(lambda change: messages.append(change["new"]), names="message")
    assert picker.batch_options() == {"cores": 1, "partition": "debug", "time": "10"}
    picker.start(block=True)
    assert picker.state == "running", picker.message
    # While starting: the job and its state, then the engines registering.
    assert any(m.startswith("Slurm job ") and "registered" in m for m in messages), messages
    assert "Slurm job" in picker.message and "RUNNING" in picker.message, picker.message
    assert list(picker.executor.map(abs, [-1, -2])) == [1, 2]
    assert picker.num_workers == 2
    picker.stop(block=True)
    assert picker.state == "stopped"


@pytest.mark.timeout(60)
def test_an_sbatch_refusal_is_said_in_plain_words(picker_factory):
    picker = picker_factory(kind="slurm", engines=2, partition="nosuchpartition")
    picker.start(block=True)
    assert picker.state == "error"
    assert picker.message.startswith("Starting the cluster failed: Slurm has no partition"), (
        picker.message
    )
    assert "Traceback" not in picker.message


def test_a_pending_job_is_said_to_be_normal_with_the_time_waited():
    pytest.importorskip("ipywidgets")
    from chemfit_widgets import ExecutorPicker

    picker = ExecutorPicker(kind="slurm", engines=4)
    try:
        picker._executor_kind = "slurm"
        picker._on_slurm_status(
            {"job_id": "4711", "state": "PENDING", "waited": 42.4, "engines": 0, "n": 4}
        )
        assert picker.message == (
            "Waiting in the Slurm queue: Slurm job 4711 pending for 42 s (normal on a busy "
            "cluster); 0 of 4 engines up"
        )
    finally:
        picker.close()
