"""A tiny stand-in for a simulation program, run by tests/chemistry/test_file_based_computer.py.

Usage: ``python fake_simulator.py MODE`` in a working directory holding ``input.json``
(``{"x": float, ...}``). Modes:

* ``ok``: write ``out.json`` with ``{"energy": (x - 1)**2, "x": x}`` and ``log.txt``;
* ``env``: like ``ok``, also recording ``$CHEMFIT_TEST_TAG`` in ``out.json``;
* ``fail``: print 30 numbered lines to stderr and exit with code 3;
* ``fail_with_output``: write ``out.json`` as in ``ok``, then exit with code 1;
* ``garbage``: write ``out.json`` that is not JSON;
* ``missing``: exit 0 without writing anything;
* ``late``: start a detached helper that writes ``out.json`` after 0.5 s, and exit at once;
* ``sleep``: start a child that records its pid in ``child.pid`` and sleeps, then sleep 60 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _result() -> dict:
    x = float(json.loads(Path("input.json").read_text())["x"])
    return {"energy": (x - 1.0) ** 2, "x": x}


def main(mode: str) -> int:
    if mode in ("ok", "env", "fail_with_output"):
        result = _result()
        if mode == "env":
            result["tag"] = os.environ.get("CHEMFIT_TEST_TAG")
        Path("out.json").write_text(json.dumps(result))
        Path("log.txt").write_text("done\n")
        return 1 if mode == "fail_with_output" else 0
    if mode == "fail":
        for i in range(30):
            print(f"stderr line {i}", file=sys.stderr)
        return 3
    if mode == "garbage":
        Path("out.json").write_text("this is not json {")
        return 0
    if mode == "missing":
        return 0
    if mode == "late":
        code = "import json, time; time.sleep(0.5); open('out.json', 'w').write(json.dumps({'energy': 0.5}))"
        # no inherited pipes, so the caller sees this program end before the file appears
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return 0
    if mode == "sleep":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        Path("child.pid").write_text(str(child.pid))
        time.sleep(60)
        return 0
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
