"""The README's example runs as written and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_commands_first():
    text = README.read_text()
    assert "make test" in text and ("make lab" in text or "make demo" in text)


@pytest.mark.timeout(120)
def test_readme_example_recovers_the_parameters(capsys):
    (example,) = _python_blocks()
    assert len(example.strip().splitlines()) <= 16
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    best = namespace["best"]
    assert best["epsilon"] == pytest.approx(0.0104, rel=0.02)
    assert best["sigma"] == pytest.approx(3.4, rel=0.01)
    assert namespace["fitter"].result.best_loss < 1e-2
