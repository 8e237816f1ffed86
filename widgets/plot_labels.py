"""The live plot's words: axis labels with units, tick labels, the title and the caption."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["caption_text", "combined_objective", "power_of_ten", "title_text", "with_unit"]

_SUPERSCRIPTS = str.maketrans(
    "-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079"
)


def flat_units(units: Mapping) -> dict[str, str]:
    """``{"lj": {"eps": "eV"}, "k": "1"}`` -> ``{"lj.eps": "eV", "k": "1"}`` (flat keys kept).

    Examples
    --------
    >>> flat_units({"lj": {"eps": "eV"}, "lj.sigma": "Å"})
    {'lj.eps': 'eV', 'lj.sigma': 'Å'}
    """
    flat: dict[str, str] = {}
    for key, value in units.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in flat_units(value).items()})
        else:
            flat[str(key)] = str(value)
    return flat


def with_unit(text: str, unit: str | None) -> str:
    """``loss [eV²]``; the text alone without a unit.

    Examples
    --------
    >>> with_unit("loss", "eV²"), with_unit("x", "")
    ('loss [eV²]', 'x')
    """
    return f"{text} [{unit}]" if unit else text


def power_of_ten(value: float, _pos: Any = None) -> str:
    """``10⁻³`` in plain Unicode: matplotlib's mathtext labels take ~50 ms each to lay out.

    Examples
    --------
    >>> [power_of_ten(v) for v in (1e-3, 1.0, 10.0, 100.0, 2e5)]
    ['10⁻³', '1', '10', '10²', '2e+05']
    """
    if not value > 0:
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) > 1e-9:
        return f"{value:.3g}"
    exponent = round(exponent)
    if exponent in (0, 1):
        return str(10**exponent)
    return "10" + str(exponent).translate(_SUPERSCRIPTS)


def ordinal(n: int) -> str:
    """``2nd``, ``20th``, ``21st``...

    Examples
    --------
    >>> [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 20, 21, 22, 100)]
    ['1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '20th', '21st', '22nd', '100th']
    """
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def combined_objective(obj: Any) -> Any:
    """The combined objective inside a fitter or a wrapper (ExecutorWrapperCOB, ...), if any.

    Examples
    --------
    >>> class Wrapper:
    ...     objective_function = type("Cob", (), {"objective_functions": []})()
    >>> combined_objective(Wrapper()) is Wrapper.objective_function, combined_objective(1)
    (True, None)
    """
    for _ in range(6):
        if isinstance(getattr(obj, "objective_functions", None), list):
            return obj
        inner = None
        for attribute in ("objective_function", "wrap_me", "cob"):
            inner = getattr(obj, attribute, None)
            if inner is not None:
                break
        if inner is None:
            return None
        obj = inner
    return None


def title_text(
    title: str,
    n: int,
    best_loss: float | None,
    loss_unit: str,
    n_penalised: int,
    *,
    n_failed: int = 0,
    n_lost: int = 0,
) -> str:
    """The figure title: evaluations shown, best loss, penalised ones, failed and lost ones
    (counted among the penalised; drawn as red crosses at the top of the loss axes).

    Examples
    --------
    >>> title_text("Fit", 3, 0.5, "eV²", 1)
    'Fit: 3 evaluations, best loss 0.5 eV², 1 penalised (not shown)'
    >>> title_text("Fit", 9, 0.5, "", 4, n_failed=2, n_lost=1)
    'Fit: 9 evaluations, best loss 0.5, 1 penalised (not shown), 2 failed, 1 lost (red x at the top)'
    >>> title_text("Fit", 0, None, "", 0)
    'Fit: waiting for evaluations'
    """
    if not n:
        return f"{title}: waiting for evaluations"
    text = f"{title}: {n:,} evaluation{'s' if n != 1 else ''}"
    if best_loss is not None:
        text += f", best loss {best_loss:.5g}"
        if loss_unit:
            text += f" {loss_unit}"
    n_faults = n_failed + n_lost
    if n_penalised > n_faults:
        text += f", {n_penalised - n_faults} penalised (not shown)"
    faults = [f"{k} {what}" for k, what in ((n_failed, "failed"), (n_lost, "lost")) if k]
    if faults:
        text += f", {', '.join(faults)} (red x at the top)"
    return text


def caption_text(n: int, points: int, stride: int, tail: int, terms: bool) -> str:
    """The caption under the figure: what the frame showed (HTML-escaped).

    Examples
    --------
    >>> caption_text(20, 20, 1, 100, False)
    '20 evaluations plotted'
    >>> caption_text(25_007, 1_102, 50, 100, True)[:71]
    'showing 1,102 of 25,007 evaluations (every 50th, each new best and the '
    """
    if stride == 1:
        text = f"{n:,} evaluation{'s' if n != 1 else ''} plotted"
    else:
        text = (
            f"showing {points:,} of {n:,} evaluations (every {ordinal(stride)}, each new "
            f"best and the newest {tail})"
        )
    if terms:
        text += "; term lines: each term's loss at the best so far"
    return html.escape(text, quote=False)
