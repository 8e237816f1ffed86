"""The package as a whole: contract import paths, light imports, layering."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import chemfit

PACKAGE_DIR = Path(chemfit.__file__).parent

# The public names of issue 3's modules, by contract module path (shared/spec/API.md).
CONTRACT = {
    "chemfit.abstract_objective_function": [
        "FutureLike",
        "ExecutorLike",
        "ChildContextConfigurator",
        "LossFunction",
        "EvaluateContext",
        "ObjectiveFunctor",
        "QuantityComputer",
        "QuantityComputerObjectiveFunction",
    ],
    "chemfit.wrap_funcs": [
        "WrappableObjFunction",
        "WrappableQuantFunction",
        "WrappedObjectiveFunctor",
        "WrappedQuantityComputer",
        "to_objective_functor",
        "to_quantity_computer",
    ],
    "chemfit.combined_objective_function": [
        "Reducer",
        "Aggregator",
        "ExceptionHandler",
        "sum_reducer",
        "mean_reducer",
        "root_mean_reducer",
        "raising_exception_handler",
        "nan_exception_handler",
        "skip_exception_handler",
        "WrappedReducer",
        "transform_generic_callables",
        "CombinedObjectiveFunction",
    ],
    "chemfit.executor_utils": [
        "AttachContextAsReturnValue",
        "map_with_context",
        "as_completed_with_context",
    ],
    "chemfit.fitter": ["FitterEvaluateContext", "FitterObjectiveFunctor", "Fitter"],
    "chemfit.fitter_callbacks": [
        "log_progress",
        "NumpyEncoder",
        "SaveMetaData",
        "CheckpointBestParameters",
        "JSONLinesHistory",
        "load_observations",
    ],
    "chemfit.results": ["EvaluationRecord", "FitHistory", "FitResult"],
    "chemfit.async_helpers": ["async_eval_one", "async_eval_many"],
    "chemfit.kabsch": ["kabsch", "apply_transform", "rmsd"],
    "chemfit.data_utils": ["DEFAULT_SLICE", "process_single_csv", "process_csv"],
    "chemfit.utils": [
        "check_protocol",
        "next_free_folder",
        "ExtendedJSONEncoder",
        "dump_dict_to_file",
        "check_params_near_bounds",
    ],
    "chemfit.debug_utils": ["log_invocation", "log_all_methods"],
    "chemfit.executors": ["make_executor", "as_executor", "SerialExecutor"],
    "chemfit.exceptions": [
        "UnknownOptimizerError",
        "NotPicklableError",
        "WorkerLostError",
        "RemoteEvaluationError",
        "ComputeError",
        "ComputeTimeoutError",
        "ExternalProgramError",
    ],
    "chemfit.parallel_execution": [
        "ExecutorWrapperCOB",
        "map_with_context",
        "as_completed_with_context",
    ],
}

TOP_LEVEL = [
    "EvaluateContext",
    "ObjectiveFunctor",
    "QuantityComputer",
    "CombinedObjectiveFunction",
    "Fitter",
    "FitterEvaluateContext",
    "map_with_context",
    "as_completed_with_context",
    "ExecutorWrapperCOB",
    "FitResult",
    "__version__",
]


@pytest.mark.parametrize("module_name", sorted(CONTRACT))
def test_contract_names_importable(module_name):
    module = importlib.import_module(module_name)
    missing = [name for name in CONTRACT[module_name] if not hasattr(module, name)]
    assert missing == [], f"{module_name} lacks {missing}"


def test_top_level_reexports():
    for name in TOP_LEVEL:
        assert hasattr(chemfit, name), name
    assert set(TOP_LEVEL) | {"MPIWrapperCOB"} <= set(chemfit.__all__)
    from chemfit import combined_objective_function

    assert (
        chemfit.CombinedObjectiveFunction is combined_objective_function.CombinedObjectiveFunction
    )
    assert chemfit.__version__.count(".") >= 2


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        chemfit.no_such_name  # noqa: B018


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PACKAGE_DIR.parent,
    )


@pytest.mark.timeout(180)
def test_headless_import_and_fit_without_jupyter_or_optional_packages():
    """With Jupyter, plotting, MPI and the optional executors made unimportable, the core
    modules import and a whole fit runs."""
    code = """
        import sys
        BLOCKED = {"IPython", "ipykernel", "ipywidgets", "ipympl", "jupyter_client",
                   "jupyterlab", "notebook", "matplotlib", "mpi4py", "loky", "ipyparallel",
                   "dask", "distributed", "ase", "widgets"}
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked for this test")
        sys.meta_path.insert(0, Blocker())
        import chemfit
        for name in ["abstract_objective_function", "wrap_funcs", "combined_objective_function",
                     "executor_utils", "fitter", "fitter_callbacks", "results", "utils",
                     "data_utils", "kabsch", "async_helpers", "executors", "exceptions",
                     "parallel_execution", "debug_utils"]:
            __import__("chemfit." + name)
        lazy = [m for m in ("nevergrad", "scipy.optimize", "pandas") if m in sys.modules]
        assert not lazy, f"imported at import time: {lazy}"
        fitter = chemfit.Fitter(lambda p: (p["x"] - 1.5) ** 2, {"x": 0.0})
        best = fitter.fit_nevergrad(budget=60, optimizer_str="OnePlusOne", seed=0)
        assert abs(best["x"] - 1.5) < 0.1, best
        try:
            chemfit.MPIWrapperCOB
        except ImportError as exc:
            assert "mpi" in str(exc), exc
        else:
            raise AssertionError("MPIWrapperCOB resolved although mpi4py is blocked")
        print("OK")
    """
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("OK")


@pytest.mark.timeout(120)
def test_mpi4py_is_imported_only_when_mpi_wrapper_is_used():
    code = """
        import sys
        import chemfit, chemfit.parallel_execution as pe
        assert "mpi4py" not in sys.modules
        cls = pe.MPIWrapperCOB
        assert "mpi4py" in sys.modules
        assert cls is chemfit.MPIWrapperCOB
        print("OK")
    """
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def _chemfit_imports(path: Path) -> set[str]:
    """The chemfit modules a source file imports."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in {"chemfit", "widgets"})
    return found


# What each layer may import (besides itself). Top-level contract shims re-export from layers.
ALLOWED = {
    "core": {"chemfit.core", "chemfit._version"},
    "chemistry": {"chemfit.core", "chemfit.chemistry"},
    "execution": {"chemfit.core", "chemfit.execution"},
    "fitting": {"chemfit.core", "chemfit.execution", "chemfit.fitting"},
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_layers_below(layer):
    violations = []
    for path in sorted((PACKAGE_DIR / layer).rglob("*.py")):
        for module in _chemfit_imports(path):
            allowed = ALLOWED[layer] | {f"chemfit.{layer}"}
            if not any(module == a or module.startswith(a + ".") for a in allowed):
                violations.append(f"{path.relative_to(PACKAGE_DIR)} imports {module}")
    assert violations == []


def test_library_code_does_not_print():
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
            ):
                offenders.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno}")
    assert offenders == []


def test_every_subpackage_is_packaged():
    """pyproject lists packages explicitly (widgets/ maps to chemfit_widgets): none forgotten."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(PACKAGE_DIR.parent).parts)
        for init in PACKAGE_DIR.rglob("__init__.py")
    }
    widget_dir = PACKAGE_DIR.parent / "widgets"
    found |= {
        ".".join(("chemfit_widgets", *init.parent.relative_to(widget_dir).parts))
        for init in widget_dir.rglob("__init__.py")
    }
    assert found == listed
