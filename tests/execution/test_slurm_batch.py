"""The batch scripts chemfit renders for Slurm, checked as text, and the options' checks (issue
16). No Slurm is needed here; the tests against a real Slurm are tests/integration/test_slurm.py.
"""

from __future__ import annotations

import pytest

from chemfit.execution.slurm_batch import (
    SlurmBatchOptions,
    dask_jobqueue_options,
    explain_sbatch_error,
    render_engine_script,
)

OPTIONS = {
    "partition": "short",
    "time": "1:30:00",
    "cores": 4,
    "memory": "8GB",
    "account": "chem42",
    "extra_directives": ["--qos=low", "#SBATCH --constraint=haswell"],
    "prologue": ["module load python"],
}


def test_the_engines_script_carries_every_option():
    script = render_engine_script(SlurmBatchOptions(**OPTIONS), n=3, mpi=False, cluster_id="c7")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh"
    for line in (
        "#SBATCH --job-name=chemfit-engines-c7",
        "#SBATCH --ntasks=3",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem-per-cpu=2048M",  # 8 GB per engine over its 4 cores
        "#SBATCH --partition=short",
        "#SBATCH --time=1:30:00",
        "#SBATCH --account=chem42",
        "#SBATCH --qos=low",
        "#SBATCH --constraint=haswell",
        "#SBATCH --export=ALL",
        "module load python",
    ):
        assert line in lines, (line, script)
    srun = lines[-1]
    assert srun.startswith("srun --cpus-per-task=4 python -m ipyparallel.engine"), srun
    assert "--mpi" not in srun
    # Every #SBATCH line comes before the first command, or sbatch ignores it.
    first_command = next(i for i, line in enumerate(lines[1:], 1) if not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])


def test_mpi_engines_are_started_by_srun_with_pmi2_as_one_world():
    script = render_engine_script(SlurmBatchOptions(), n=2, mpi=True)
    srun = script.splitlines()[-1]
    assert srun.startswith("srun --mpi=pmi2 --cpus-per-task=1 python -m ipyparallel.engine --mpi")
    other = render_engine_script(SlurmBatchOptions(srun_mpi="pmix"), n=2, mpi=True)
    assert other.splitlines()[-1].startswith("srun --mpi=pmix ")


def test_braces_in_user_text_survive_ipyparallel_formatting():
    options = SlurmBatchOptions(prologue=["export A=${HOME}/x"], job_name="fit{1}")
    script = render_engine_script(options, n=1, mpi=False)
    assert "export A=${HOME}/x" in script and "#SBATCH --job-name=fit{1}" in script


def test_the_dask_workers_job_script_carries_every_option():
    pytest.importorskip("distributed")
    from chemfit.execution.dask_clusters import _require_jobqueue

    try:  # not importorskip: chemfit keeps dask_jobqueue from taking over SIGINT
        jobqueue = _require_jobqueue()
    except ImportError:
        pytest.skip("dask-jobqueue is not installed")
    kwargs = dask_jobqueue_options(SlurmBatchOptions(**OPTIONS))
    # The script is rendered by dask-jobqueue itself: it needs no sbatch.
    with jobqueue.SLURMCluster(**kwargs, scheduler_options={"dashboard_address": ":0"}) as cluster:
        script = cluster.job_script()
    for line in (
        "#SBATCH -J chemfit-dask",
        "#SBATCH -p short",
        "#SBATCH -A chem42",
        "#SBATCH -t 1:30:00",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=8G",
        "#SBATCH --qos=low",
        "#SBATCH --constraint=haswell",
        "module load python",
    ):
        assert line in script.splitlines(), (line, script)
    assert "--nthreads 4" in script


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"time": "2h"}, "is not a Slurm time limit"),
        ({"time": -5}, "is not a Slurm time limit"),
        ({"memory": "a lot"}, "is not a memory size"),
        ({"cores": 0}, "cores must be a positive int"),
        ({"partition": "two words"}, "must not contain spaces"),
        ({"extra_directives": ["qos=low"]}, "is not an sbatch option"),
        ({"extra_directives": ["--a\n--b"]}, "must be single lines"),
    ],
)
def test_bad_options_are_named_before_anything_is_submitted(options, words):
    with pytest.raises(ValueError, match=words):
        SlurmBatchOptions(**options)


def test_sbatch_errors_in_plain_words():
    text = explain_sbatch_error("sbatch: error: Invalid time limit specification")
    assert text.startswith("Slurm refused the time limit. Write minutes")
    text = explain_sbatch_error(
        "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    )
    assert text.startswith("no node of the partition has that many cores")
    assert explain_sbatch_error("sbatch: error: something new").startswith(
        "sbatch refused the job (sbatch said: sbatch: error: something new)"
    )


def test_batch_options_need_slurm_engines():
    pytest.importorskip("ipyparallel")
    from chemfit.executors import make_executor

    with pytest.raises(TypeError, match=r"\['partition'\] apply only to engines='slurm'"):
        make_executor("ipyparallel", 2, partition="debug")
    with pytest.raises(TypeError, match="unexpected options"):
        make_executor("ipyparallel", 2, engines="slurm", partitoin="debug")
    with pytest.raises(ValueError, match="unknown engines='pbs'"):
        make_executor("ipyparallel", 2, engines="pbs")


def test_slurm_needs_the_number_of_engines_or_workers():
    pytest.importorskip("ipyparallel")
    pytest.importorskip("distributed")
    from chemfit.executors import make_executor

    with pytest.raises(ValueError, match=r"engines='slurm' needs .* pass max_workers"):
        make_executor("ipyparallel", engines="slurm", partition="debug")
    with pytest.raises(ValueError, match=r"cluster='slurm' needs .* pass max_workers"):
        make_executor("dask", cluster="slurm", partition="debug")


def test_dask_options_are_checked():
    pytest.importorskip("distributed")
    from chemfit.executors import make_executor

    with pytest.raises(TypeError, match="apply only to cluster='slurm'"):
        make_executor("dask", 1, partition="debug")
    with pytest.raises(ValueError, match="unknown cluster='pbs'"):
        make_executor("dask", 1, cluster="pbs")
    with pytest.raises(TypeError, match="not both"):
        make_executor("dask", 1, cluster="local", address="tcp://127.0.0.1:8786")


@pytest.mark.timeout(60)
def test_dask_local_cluster_and_connecting_to_its_scheduler_by_address(monkeypatch):
    pytest.importorskip("distributed")
    from chemfit.executors import make_executor

    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    with make_executor("dask", 2, cluster="local") as local:
        assert list(local.map(abs, [-1, -2, -3])) == [1, 2, 3]
        assert local.n_workers == 2
        port = local.cluster.dashboard_link.split(":")[-1].split("/")[0]
        assert local.dashboard_link == f"/user/ada/proxy/{port}/status"
        address = local.cluster.scheduler_address
        with make_executor("dask", 1, address=address) as connected:
            assert connected.submit(pow, 2, 5).result(timeout=30) == 32
            assert not connected.owns_cluster
        # Disconnecting left the scheduler and its workers running.
        assert local.submit(pow, 3, 2).result(timeout=30) == 9
    assert local.cluster.status.name == "closed"
