"""Batched, thick-restarted Lanczos: exact on clustered spectra, padded and exhausted blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffcut.accel.lanczos import DeflatedBlocks, top_eigenvectors


def _graph_with_spectrum(rng: np.random.Generator, n: int, top: list[float]) -> np.ndarray:
    """A dense W whose M = D^-1/2 W D^-1/2 has eigenvalues 1, then ``top``, then a bulk.

    Built with unit degrees (D = I): M = q q^T + U diag(top) U^T + bulk, U orthogonal to q.
    Entries may be negative; the solver only needs a symmetric operator.
    """
    q = np.full(n, 1 / np.sqrt(n))
    basis, _ = np.linalg.qr(np.column_stack([q, rng.normal(size=(n, n - 1))]))
    vals = np.concatenate([[1.0], top, rng.uniform(-0.3, 0.3, n - 1 - len(top))])
    m = (basis * vals) @ basis.T
    return (m + m.T) / 2


def _operator(ws: list[np.ndarray]) -> tuple[DeflatedBlocks, torch.Tensor]:
    width = max(len(w) for w in ws)
    blocks = torch.zeros((len(ws), width, width), dtype=torch.float64)
    for b, w in enumerate(ws):
        blocks[b, : len(w), : len(w)] = torch.from_numpy(w)
    degree = torch.zeros((len(ws), width), dtype=torch.float64)
    for b, w in enumerate(ws):
        degree[b, : len(w)] = 1.0  # the spectra above are built for D = I
    start = torch.rand(
        degree.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    return DeflatedBlocks.from_blocks(blocks, degree), start * (degree > 0)


@pytest.mark.parametrize("gap", [1e-3, 1e-5])
def test_clustered_spectrum_gives_the_top_vector(rng: np.random.Generator, gap: float) -> None:
    # Three eigenvalues within 2 * gap of each other: the k-region case.
    w = _graph_with_spectrum(rng, 400, [0.99, 0.99 - gap, 0.99 - 2 * gap])
    op, start = _operator([w])
    vec, val, _ = top_eigenvectors(op, start, tol=1e-10)
    vals, vecs = np.linalg.eigh(w)
    assert float(val[0]) == pytest.approx(vals[-2], abs=1e-9)  # vals[-1] = 1 is deflated
    overlap = abs(float(vec[0].numpy() @ vecs[:, -2]))
    assert overlap > 1 - 1e-6


def test_an_unrestarted_solver_fails_there(rng: np.random.Generator) -> None:
    # The test above can fail: one short cycle does not separate the cluster.
    w = _graph_with_spectrum(rng, 400, [0.99, 0.99 - 1e-5, 0.99 - 2e-5])
    op, start = _operator([w])
    vec, _, _ = top_eigenvectors(op, start, basis=8, keep=1, max_cycles=1)
    overlap = abs(float(vec[0].numpy() @ np.linalg.eigh(w)[1][:, -2]))
    assert overlap < 0.999


def test_batch_equals_one_by_one_and_padding_is_inert(rng: np.random.Generator) -> None:
    ws = [_graph_with_spectrum(rng, n, [0.9, 0.8]) for n in (30, 200, 120)]
    op, start = _operator(ws)
    vec, val, cycles = top_eigenvectors(op, start, tol=1e-10)
    for b, w in enumerate(ws):
        n = len(w)
        assert torch.all(vec[b, n:] == 0)
        exact = np.linalg.eigh(w)[1][:, -2]
        assert abs(float(vec[b, :n].numpy() @ exact)) > 1 - 1e-8
        assert float(val[b]) == pytest.approx(0.9, abs=1e-9)
    assert cycles.min() >= 1


def test_exhausted_small_block_is_exact(rng: np.random.Generator) -> None:
    # 5 nodes, basis of 48: the Krylov space is exhausted after 4 steps.
    w = _graph_with_spectrum(rng, 5, [0.5])
    op, start = _operator([w])
    vec, val, cycles = top_eigenvectors(op, start)
    assert int(cycles[0]) == 1
    assert float(val[0]) == pytest.approx(np.linalg.eigh(w)[0][-2], abs=1e-12)


def test_negative_top_eigenvalue(rng: np.random.Generator) -> None:
    # All non-trivial eigenvalues negative: dead basis vectors (value 0) must not win.
    w = _graph_with_spectrum(rng, 6, [-0.05, -0.1, -0.2, -0.2, -0.3])
    op, start = _operator([w])
    _, val, _ = top_eigenvectors(op, start)
    assert float(val[0]) == pytest.approx(-0.05, abs=1e-12)
