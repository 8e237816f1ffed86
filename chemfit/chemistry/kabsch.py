"""Optimal rigid superposition of two point sets (the Kabsch algorithm) and the RMSD.

Points are **row vectors**: a set of ``N`` points in ``D`` dimensions is an ``(N, D)`` array,
and a transform ``(R, t)`` maps ``P`` to ``P @ R + t``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["apply_transform", "kabsch", "rmsd"]


def _as_point_set(name: str, points: ArrayLike) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty (N, D) array of row vectors, got shape {arr.shape}; "
            "stack the points as rows"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; pass finite coordinates")
    return arr


def _check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}; "
            "pass corresponding points in the same order"
        )


def _as_weights(weights: ArrayLike | None, n_points: int) -> np.ndarray:
    if weights is None:
        return np.ones(n_points)
    w = np.asarray(weights, dtype=float)
    if w.shape != (n_points,):
        raise ValueError(
            f"weights must have shape ({n_points},), one per point, got shape {w.shape}"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w!r}")
    if not w.sum() > 0:
        raise ValueError("weights sum to zero; give at least one point a positive weight")
    return w


def kabsch(
    P: ArrayLike,
    Q: ArrayLike,
    weights: ArrayLike | None = None,
    allow_reflection: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Find the rotation ``R`` and translation ``t`` that best map ``P`` onto ``Q``.

    Minimises ``sum_i w_i * |P_i @ R + t - Q_i|^2`` over rotations (proper, ``det(R) = +1``;
    with ``allow_reflection`` also improper, ``det(R) = -1``) and translations.

    Parameters
    ----------
    P, Q : array_like, shape (N, D)
        Corresponding points as rows, with ``N >= D``.
    weights : array_like, shape (N,), optional
        Non-negative weights (e.g. masses) with a positive sum. Equal weights by default.
    allow_reflection : bool
        Allow improper rotations (mirror images).

    Returns
    -------
    R : ndarray, shape (D, D)
        The orthogonal matrix, applied from the right.
    t : ndarray, shape (D,)
        The translation, so that ``Q ≈ P @ R + t``.

    Raises
    ------
    ValueError
        Bad shapes, fewer points than dimensions, non-finite values or bad weights.

    Notes
    -----
    Without weights the centroids are the plain means ``P.mean(axis=0)``, and ``R`` and ``t``
    equal upstream chemfit's to the last bit.

    Examples
    --------
    >>> P = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    >>> Rz = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    >>> Q = P @ Rz + [1.0, 2.0, 3.0]
    >>> R, t = kabsch(P, Q)
    >>> bool(np.allclose(R, Rz)), bool(np.allclose(t, [1.0, 2.0, 3.0]))
    (True, True)
    """
    P_arr = _as_point_set("P", P)
    Q_arr = _as_point_set("Q", Q)
    _check_same_shape("P", P_arr, "Q", Q_arr)
    n_points, dim = P_arr.shape
    if n_points < dim:
        raise ValueError(
            f"kabsch needs at least as many points as dimensions, got N={n_points} points in "
            f"D={dim} dimensions; pass at least {dim} points"
        )
    if weights is None:
        # the plain mean, so that unweighted results agree with upstream's to the last bit
        centroid_p = P_arr.mean(axis=0)
        centroid_q = Q_arr.mean(axis=0)
    else:
        w = _as_weights(weights, n_points)
        centroid_p = w @ P_arr / w.sum()
        centroid_q = w @ Q_arr / w.sum()
    P_c = P_arr - centroid_p
    Q_c = Q_arr - centroid_q

    # Row vectors: maximise trace(R^T H) with H = P_c^T W Q_c, whose optimum is U @ Vt.
    H = P_c.T @ Q_c if weights is None else (P_c * w[:, None]).T @ Q_c
    U, _, Vt = np.linalg.svd(H)
    R = U @ Vt
    if not allow_reflection and np.linalg.det(R) < 0:
        U[:, -1] = -U[:, -1]
        R = U @ Vt
    t = centroid_q - centroid_p @ R
    return R, t


def apply_transform(P: ArrayLike, R: ArrayLike, t: ArrayLike) -> np.ndarray:
    """Return ``P @ R + t`` for row vectors ``P`` of shape ``(N, D)`` (or one point ``(D,)``).

    Examples
    --------
    >>> apply_transform([[1.0, 0.0]], [[0.0, 1.0], [-1.0, 0.0]], [0.0, 1.0])
    array([[0., 2.]])
    """
    P_arr = np.asarray(P, dtype=float)
    R_arr = np.asarray(R, dtype=float)
    t_arr = np.asarray(t, dtype=float)
    if P_arr.ndim not in (1, 2) or P_arr.shape[-1] == 0:
        raise ValueError(f"P must have shape (N, D) or (D,), got shape {P_arr.shape}")
    dim = P_arr.shape[-1]
    if R_arr.shape != (dim, dim):
        raise ValueError(f"R must have shape ({dim}, {dim}) to match P, got shape {R_arr.shape}")
    if t_arr.shape != (dim,):
        raise ValueError(f"t must have shape ({dim},) to match P, got shape {t_arr.shape}")
    return P_arr @ R_arr + t_arr


def rmsd(A: ArrayLike, B: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Root-mean-square deviation ``sqrt(sum_i w_i |A_i - B_i|^2 / sum_i w_i)``.

    No superposition is done; call :func:`kabsch` and :func:`apply_transform` first for the
    minimal RMSD.

    Parameters
    ----------
    A, B : array_like, shape (N, D)
        Corresponding points as rows.
    weights : array_like, shape (N,), optional
        Non-negative weights with a positive sum. Equal weights by default.

    Examples
    --------
    >>> rmsd([[0.0, 0.0], [0.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]])
    3.5355339059327378
    >>> rmsd([[0.0, 0.0], [0.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]], weights=[1.0, 0.0])
    5.0
    """
    A_arr = _as_point_set("A", A)
    B_arr = _as_point_set("B", B)
    _check_same_shape("A", A_arr, "B", B_arr)
    w = _as_weights(weights, A_arr.shape[0])
    sq = np.sum((A_arr - B_arr) ** 2, axis=1)
    return float(np.sqrt(w @ sq / w.sum()))
