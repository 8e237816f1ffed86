"""Tests of chemfit.kabsch (chemistry/kabsch.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from chemfit.chemistry.kabsch import apply_transform, kabsch, rmsd


def _random_rotation(rng, dim):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("seed", range(5))
def test_random_3d_rotations_and_translations_are_recovered(seed):
    rng = np.random.default_rng(seed)
    P = rng.normal(size=(12, 3))
    R_true = Rotation.random(random_state=seed).as_matrix()
    t_true = rng.normal(size=3) * 5
    Q = P @ R_true + t_true
    R, t = kabsch(P, Q)
    np.testing.assert_allclose(R, R_true, atol=1e-10)
    np.testing.assert_allclose(t, t_true, atol=1e-10)
    assert np.linalg.det(R) == pytest.approx(1.0)
    assert rmsd(apply_transform(P, R, t), Q) < 1e-10


@pytest.mark.parametrize("dim", [2, 4])
def test_other_dimensions(dim):
    rng = np.random.default_rng(dim)
    P = rng.normal(size=(dim + 3, dim))
    R_true = _random_rotation(rng, dim)
    Q = P @ R_true - 1.5
    R, t = kabsch(P, Q)
    np.testing.assert_allclose(R, R_true, atol=1e-10)
    np.testing.assert_allclose(t, np.full(dim, -1.5), atol=1e-10)


def test_noisy_points_give_least_squares_fit():
    rng = np.random.default_rng(7)
    P = rng.normal(size=(50, 3))
    R_true = Rotation.random(random_state=3).as_matrix()
    Q = P @ R_true + 0.01 * rng.normal(size=P.shape)
    R, t = kabsch(P, Q)
    best = rmsd(apply_transform(P, R, t), Q)
    # small perturbations of the optimum are never better
    for _ in range(10):
        dR = Rotation.from_rotvec(1e-3 * rng.normal(size=3)).as_matrix()
        assert rmsd(apply_transform(P, R @ dR, t), Q) >= best
        assert rmsd(apply_transform(P, R, t + 1e-3 * rng.normal(size=3)), Q) >= best
    assert best < 0.02


def test_mirror_image_needs_allow_reflection():
    rng = np.random.default_rng(1)
    P = rng.normal(size=(10, 3))
    mirror = np.diag([1.0, 1.0, -1.0])
    R_rot = Rotation.random(random_state=4).as_matrix()
    Q = P @ mirror @ R_rot + [1.0, 0.0, 0.0]

    R_proper, t_proper = kabsch(P, Q)
    assert np.linalg.det(R_proper) == pytest.approx(1.0)
    assert rmsd(apply_transform(P, R_proper, t_proper), Q) > 0.1

    R_any, t_any = kabsch(P, Q, allow_reflection=True)
    assert np.linalg.det(R_any) == pytest.approx(-1.0)
    np.testing.assert_allclose(R_any, mirror @ R_rot, atol=1e-10)
    assert rmsd(apply_transform(P, R_any, t_any), Q) < 1e-10


def test_allow_reflection_returns_proper_rotation_when_that_is_best():
    rng = np.random.default_rng(2)
    P = rng.normal(size=(8, 3))
    R_true = Rotation.random(random_state=9).as_matrix()
    R, _ = kabsch(P, P @ R_true, allow_reflection=True)
    np.testing.assert_allclose(R, R_true, atol=1e-10)


def test_weights_select_the_points_that_matter():
    rng = np.random.default_rng(5)
    P = rng.normal(size=(6, 3))
    R_true = Rotation.random(random_state=11).as_matrix()
    Q = P @ R_true + [0.0, 2.0, 0.0]
    Q_bad = Q.copy()
    Q_bad[-1] += 100.0  # an outlier with weight zero must not matter
    weights = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 0.0])
    R, t = kabsch(P, Q_bad, weights=weights)
    np.testing.assert_allclose(R, R_true, atol=1e-10)
    np.testing.assert_allclose(t, [0.0, 2.0, 0.0], atol=1e-10)
    # without weights the outlier pulls the fit away
    R_unweighted, _ = kabsch(P, Q_bad)
    assert not np.allclose(R_unweighted, R_true, atol=1e-3)


def test_weighted_translation_uses_weighted_centroids():
    P = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    Q = P + np.array([3.0, -1.0])
    R, t = kabsch(P, Q, weights=[5.0, 1.0, 1.0])
    np.testing.assert_allclose(R, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(t, [3.0, -1.0], atol=1e-12)


def _upstream_unweighted_kabsch(P, Q):
    """Upstream chemfit 3.1's unweighted steps: plain-mean centroids, H = P0^T Q0, R = U Vt
    (last column of U flipped for a proper rotation), t = cQ - cP R."""
    cP, cQ = P.mean(axis=0), Q.mean(axis=0)
    U, _, Vt = np.linalg.svd((P - cP).T @ (Q - cQ))
    R = U @ Vt
    if np.linalg.det(R) < 0:
        U[:, -1] *= -1.0
        R = U @ Vt
    return R, cQ - cP @ R


@pytest.mark.parametrize(("seed", "dim"), [(s, d) for s in range(6) for d in (2, 3)])
def test_unweighted_results_agree_with_upstream_to_the_last_bit(seed, dim):
    rng = np.random.default_rng(100 + seed)
    P = rng.normal(size=(17, dim)) * 3.7 + rng.normal(size=dim) * 50.0  # off-centre points
    R_true = _random_rotation(rng, dim)
    Q = P @ R_true + rng.normal(size=dim) * 20.0  # noise-free
    R, t = kabsch(P, Q)
    R_up, t_up = _upstream_unweighted_kabsch(P, Q)
    assert np.array_equal(R, R_up), np.max(np.abs(R - R_up))
    assert np.array_equal(t, t_up), np.max(np.abs(t - t_up))


def test_rmsd_values():
    A = np.zeros((2, 3))
    B = np.array([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]])  # squared distances 9 and 0
    assert rmsd(A, B) == pytest.approx(np.sqrt(4.5))
    assert rmsd(A, B, weights=[1.0, 2.0]) == pytest.approx(np.sqrt(9.0 / 3.0))
    assert rmsd(A, B, weights=[0.0, 1.0]) == 0.0
    assert isinstance(rmsd(A, B), float)


def test_apply_transform_single_point_and_shapes():
    R = np.array([[0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(apply_transform([1.0, 0.0], R, [0.0, 0.0]), [0.0, 1.0])
    with pytest.raises(ValueError, match="R must have shape"):
        apply_transform(np.zeros((3, 2)), np.eye(3), np.zeros(2))
    with pytest.raises(ValueError, match="t must have shape"):
        apply_transform(np.zeros((3, 2)), np.eye(2), np.zeros(3))


@pytest.mark.parametrize(
    ("P", "Q", "match"),
    [
        (np.zeros((4, 3)), np.zeros((4, 2)), "same shape"),
        (np.zeros((4, 3)), np.zeros((5, 3)), "same shape"),
        (np.zeros(3), np.zeros(3), r"\(N, D\)"),
        (np.zeros((0, 3)), np.zeros((0, 3)), r"\(N, D\)"),
        (np.zeros((2, 3)), np.zeros((2, 3)), "at least as many points"),
        (np.full((4, 3), np.nan), np.zeros((4, 3)), "NaN or inf"),
    ],
)
def test_kabsch_bad_inputs(P, Q, match):
    with pytest.raises(ValueError, match=match):
        kabsch(P, Q)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, 1.0, 1.0], r"shape \(4,\)"),
        ([[1.0, 1.0, 1.0, 1.0]], r"shape \(4,\)"),
        ([1.0, -1.0, 1.0, 1.0], ">= 0"),
        ([1.0, np.inf, 1.0, 1.0], "finite"),
        ([0.0, 0.0, 0.0, 0.0], "sum to zero"),
    ],
)
def test_bad_weights(weights, match):
    P = np.random.default_rng(0).normal(size=(4, 3))
    with pytest.raises(ValueError, match=match):
        kabsch(P, P, weights=weights)
    with pytest.raises(ValueError, match=match):
        rmsd(P, P, weights=weights)


def test_rmsd_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        rmsd(np.zeros((3, 3)), np.zeros((3, 2)))


def test_contract_module_path():
    import chemfit.kabsch as shim

    assert shim.kabsch is kabsch and shim.rmsd is rmsd and shim.apply_transform is apply_transform
