#!/usr/bin/env bash
# Create (idempotently) the venv that holds upstream chemfit 3.1.1 from PyPI, for
# benchmarks/compare_upstream.py. Upstream's import name is also `chemfit`, so it cannot share
# .venv: each side of a comparison runs in its own venv, in its own subprocess.
#
# The venv gets the same interpreter as .venv and, when .venv exists, the same versions of
# numpy, mpi4py, mpich (the MPI library, as a wheel: no system MPI needed), loky and
# cloudpickle, so that both sides run the same numerics and the same MPI. Without .venv (a
# fresh machine) it takes the versions the project declares.
#
# Usage: benchmarks/upstream_env.sh            (prints the venv's python on its last line)
# Environment: UPSTREAM_VENV (default: .venv-upstream in the project root), PYTHON (the
# interpreter when .venv does not exist; default python3, as in the Makefile).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${UPSTREAM_VENV:-$root/.venv-upstream}"
main_python="$root/.venv/bin/python"
upstream_version="3.1.1"

# Same interpreter as .venv (the one it was made from), else $PYTHON as the Makefile does.
if [ -x "$main_python" ]; then
    base_python="$("$main_python" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"
else
    base_python="${PYTHON:-python3}"
fi

# Shared packages pinned to .venv's versions when it has them.
shared_requirements() {
    local defaults=("numpy>=1.24,<2.4" "mpi4py>=4" "mpich" "loky>=3.4" "cloudpickle>=2.2")
    if [ ! -x "$main_python" ]; then
        printf '%s\n' "${defaults[@]}"
        return
    fi
    "$main_python" - "${defaults[@]}" <<'EOF'
import re
import sys
from importlib import metadata

for default in sys.argv[1:]:
    name = re.split(r"[<>=!~ ]", default, maxsplit=1)[0]
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(default)
EOF
}

mapfile -t requirements < <(echo "chemfit==$upstream_version"; shared_requirements)
spec="$(printf '%s\n' "$base_python" "${requirements[@]}")"
stamp="$venv/.installed"

# The check runs from / so that no chemfit checkout on sys.path can shadow the installed one.
check_venv() {
    (cd / && "$venv/bin/python" - "$venv" "$upstream_version" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path

import chemfit.executor_wrapper_cob
import chemfit.mpi_wrapper_cob
from mpi4py import MPI

venv, wanted = Path(sys.argv[1]).resolve(), sys.argv[2]
found = metadata.version("chemfit")
where = Path(chemfit.executor_wrapper_cob.__file__).resolve()
if found != wanted or venv not in where.parents:
    sys.exit(f"expected chemfit {wanted} inside {venv}, found {found} at {where}")
print(f"chemfit {found} at {where.parent}; {MPI.Get_library_version().splitlines()[0]}")
EOF
    ) && [ -x "$venv/bin/mpiexec" ]
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$spec" ] && check_venv >/dev/null 2>&1; then
    echo "upstream venv up to date: $venv" >&2
else
    echo "creating the upstream venv in $venv from $base_python:" "${requirements[@]}" >&2
    rm -f "$stamp"
    test -x "$venv/bin/python" || "$base_python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip uv
    # bytecode compiled at install time, as in .venv: no worker compiles on its first import
    (cd / && VIRTUAL_ENV="$venv" "$venv/bin/uv" pip install -q --compile-bytecode "${requirements[@]}")
    check_venv >&2
    printf '%s\n' "$spec" >"$stamp"
fi
echo "$venv/bin/python"
