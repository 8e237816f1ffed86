"""binder/ and pyproject.toml agree on what a Binder launch installs.

With a ``binder/`` folder Binder ignores ``pyproject.toml``: it installs exactly what
``binder/requirements.txt`` lists, on the Python of ``binder/runtime.txt``, then runs
``binder/postBuild``. These checks are static and fast; ``.ci/binder-check`` installs the spec
into a fresh virtualenv and runs the notebooks there.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
BINDER = ROOT / "binder"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
#: Extras for developing chemfit, not for using it: Binder leaves them out.
TOOL_EXTRAS = {"dev", "test", "docs"}
#: Extras for a cluster's batch scheduler (Slurm): Binder has none, so it leaves them out.
SCHEDULER_EXTRAS = {"slurm"}
NAME = canonicalize_name(PROJECT["name"])


def binder_lines() -> list[str]:
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def editable_extras() -> set[str]:
    """The extras of the ``-e .[...]`` line that installs chemfit itself."""
    found = [line for line in binder_lines() if re.match(r"^(-e|--editable)\s+\.(\[|$)", line)]
    assert len(found) == 1, (
        f"binder/requirements.txt must install this repository once, as '-e .[extras]'; "
        f"found {found}"
    )
    match = re.search(r"\[([^\]]*)\]", found[0])
    return {e.strip() for e in match.group(1).split(",")} if match else set()


def other_requirements() -> list[Requirement]:
    return [Requirement(line) for line in binder_lines() if not line.startswith(("-e", "--"))]


def expand_extras(extras: set[str]) -> list[Requirement]:
    """pyproject's requirements for chemfit with ``extras``, self-references resolved."""
    requirements = [Requirement(r) for r in PROJECT["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in EXTRAS[extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == NAME:
                todo.extend(requirement.extras)
            else:
                requirements.append(requirement)
    return requirements


def installed_closure(roots: list[Requirement]) -> set[str]:
    """Names of every distribution the roots pull in, read from this environment's metadata."""
    names: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in roots]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in names:
            continue
        names.add(key)
        names.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here; the name itself still counts
        for line in requires:
            child = Requirement(line)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                todo.append((child, frozenset(child.extras)))
    return names


def notebook_imports() -> dict[str, set[str]]:
    """Top-level modules imported by the notebooks' code cells -> the notebooks importing them."""
    nbformat = pytest.importorskip("nbformat")
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            source = "\n".join(
                line
                for line in cell.source.splitlines()
                if not line.lstrip().startswith(("%", "!"))
            )
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    found.setdefault(module.partition(".")[0], set()).add(path.name)
    return found


def test_binder_folder_has_what_binder_needs():
    assert (BINDER / "requirements.txt").is_file()
    assert not (ROOT / ".binder").exists(), "having both binder/ and .binder/ is a Binder error"
    for overriding in ("Dockerfile", "environment.yml"):
        assert not (BINDER / overriding).exists(), (
            f"binder/{overriding} would override binder/requirements.txt; keep one spec"
        )
    post_build = BINDER / "postBuild"
    text = post_build.read_text()
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable (chmod +x)"
    assert text.startswith("#!/bin/bash\n"), "binder/postBuild must start with #!/bin/bash"
    assert re.search(r"^set -[a-z]*e", text, re.M), "postBuild needs `set -e`, or errors pass"
    assert "mpi4py" in text and "mpiexec" in text, "postBuild should check that MPI works"


def test_runtime_is_a_python_that_pyproject_supports():
    text = (BINDER / "runtime.txt").read_text().strip()
    match = re.fullmatch(r"python-(\d+)\.(\d+)", text)
    assert match, f"binder/runtime.txt must read like 'python-3.11', got {text!r}"
    version = f"{match.group(1)}.{match.group(2)}"
    assert SpecifierSet(PROJECT["requires-python"]).contains(version), (
        f"runtime.txt asks for Python {version}, but pyproject.toml requires-python is "
        f"{PROJECT['requires-python']!r}"
    )


def test_binder_installs_chemfit_with_every_runtime_extra():
    extras = editable_extras()
    unknown = extras - set(EXTRAS)
    assert not unknown, f"binder/requirements.txt names extras pyproject.toml lacks: {unknown}"
    runtime = set(EXTRAS) - TOOL_EXTRAS - SCHEDULER_EXTRAS
    missing = runtime - extras
    assert not missing, (
        f"pyproject.toml's runtime extras {sorted(missing)} are not installed on Binder: add "
        f"them to the '-e .[...]' line of binder/requirements.txt (or to TOOL_EXTRAS here if "
        "they are only for developing chemfit, to SCHEDULER_EXTRAS if they need a batch scheduler)"
    )
    tools = extras & TOOL_EXTRAS
    assert not tools, f"Binder does not need the tool-only extras {sorted(tools)}"


def test_extra_binder_requirements_agree_with_pyproject():
    declared = {}
    for requirement in expand_extras(set(EXTRAS) - TOOL_EXTRAS - SCHEDULER_EXTRAS):
        declared.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    for requirement in other_requirements():
        name = canonicalize_name(requirement.name)
        assert name != NAME, "install chemfit once, through the '-e .[...]' line"
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} (binder/requirements.txt) is not installed in this environment")
        for spec in [requirement, *declared.get(name, [])]:
            assert spec.specifier.contains(version, prereleases=True), (
                f"the installed {name} {version} (from pyproject.toml) does not satisfy "
                f"{spec}: binder/requirements.txt and pyproject.toml disagree"
            )


def test_every_notebook_import_is_installed_on_binder():
    roots = expand_extras(editable_extras()) + other_requirements()
    closure = installed_closure(roots) | {NAME}
    distributions = importlib.metadata.packages_distributions()
    local = {path.stem for path in (ROOT / "notebooks").glob("*.py")}
    problems = []
    for module, notebooks in sorted(notebook_imports().items()):
        if module in sys.stdlib_module_names or module in local or module == "__future__":
            continue
        names = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not names:
            problems.append(f"{module} ({', '.join(sorted(notebooks))}): not installed here")
        elif not names & closure:
            problems.append(
                f"{module} ({', '.join(sorted(notebooks))}): from {sorted(names)}, which "
                "binder/requirements.txt does not pull in"
            )
    assert not problems, "notebook imports missing on Binder:\n" + "\n".join(problems)
