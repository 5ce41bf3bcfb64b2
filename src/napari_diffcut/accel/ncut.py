"""Cut in torch: batched two-way Normalized Cuts of many sub-graphs (method.md 5).

The torch twin of :mod:`napari_diffcut.core.ncut`. Sub-graphs of W are
gathered into zero-padded blocks ``(B, s, s)``; the Fiedler vectors of all of
them come from one batched Lanczos run (:mod:`napari_diffcut.accel.lanczos`)
and the best split position of each is found by the same exact sweep as
:func:`napari_diffcut.core.ncut.sweep_cut`, vectorised over the batch. Same
dtypes as the numpy path: products with W in W's dtype (float32 in the tree),
degrees, Lanczos vectors, sweep sums and costs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from napari_diffcut.accel.lanczos import DeflatedBlocks, block_product, top_eigenvectors
from napari_diffcut.core.ncut import Bipartition, start_vector


@dataclass(frozen=True)
class BlockBatch:
    """Sub-graphs of one affinity stacked as zero-padded blocks.

    Attributes
    ----------
    blocks : torch.Tensor, shape (B, s, s)
        ``W[idx_b][:, idx_b]`` in W's dtype, zero outside the first ``sizes[b]`` rows/cols.
    degree : torch.Tensor of float64, shape (B, s)
        Row sums inside each block (0 on padding).
    valid : torch.Tensor of bool, shape (B, s)
        True on the first ``sizes[b]`` entries.
    sizes : list of int
        Nodes per block.
    """

    blocks: torch.Tensor
    degree: torch.Tensor
    valid: torch.Tensor
    sizes: list[int]


def gather_blocks(affinity: torch.Tensor, members: list[NDArray[np.int64]]) -> BlockBatch:
    """Stack ``affinity`` restricted to each index set (Shi & Malik's recursion: edges out dropped).

    Parameters
    ----------
    affinity : torch.Tensor, shape (N, N)
        Symmetric W.
    members : list of int ndarrays
        Node indices of each sub-graph, in the order the nodes are to keep.

    Returns
    -------
    BlockBatch
    """
    sizes = [len(m) for m in members]
    width = max(sizes)
    dev = affinity.device
    valid = torch.arange(width, device=dev)[None, :] < torch.as_tensor(sizes, device=dev)[:, None]
    if (
        len(members) == 1
        and sizes[0] == affinity.shape[0]
        and np.array_equal(members[0], np.arange(sizes[0]))
    ):
        blocks = affinity.unsqueeze(0)  # the whole graph: a view, no copy
    else:
        blocks = affinity.new_zeros((len(members), width, width))
        for b, m in enumerate(members):
            idx = torch.from_numpy(np.asarray(m, np.int64)).to(dev)
            blocks[b, : len(m), : len(m)] = affinity.index_select(0, idx).index_select(1, idx)
    degree = row_sums(blocks)
    return BlockBatch(blocks, degree, valid, sizes)


def row_sums(blocks: torch.Tensor) -> torch.Tensor:
    """Row sums of float32 blocks as float64.

    torch sums float32 by cascade (pairwise) summation on the CPU and by tree
    reduction on CUDA: relative error about 1e-7 at worst for 4096 terms,
    where the numpy path sums in float64. The costs this changes move by
    about 1e-7 (tests/accel), far inside the 1e-4 the paths must agree to,
    and converting the block to float64 first costs 50x more on the CPU.
    """
    return blocks.sum(dim=-1).to(torch.float64)


def start_vectors(sizes: list[int], width: int, seed: int) -> torch.Tensor:
    """Each block's seeded start vector: the numpy path's ``core.ncut.start_vector``, padded."""
    out = np.zeros((len(sizes), width), np.float64)
    for b, n in enumerate(sizes):
        out[b, :n] = start_vector(n, seed)
    return torch.from_numpy(out)


def fiedler_vectors(
    batch: BlockBatch, *, seed: int = 0, tol: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fiedler vectors ``z = D^-1/2 u_2`` of every block (Shi & Malik 2000, eq. 7).

    ``u_2`` is the top eigenvector of the deflated ``D^-1/2 W D^-1/2 - q q^T``
    (:mod:`napari_diffcut.accel.lanczos`); the sign is fixed so that each
    block's largest-magnitude entry is positive (DiffCut's rule, as in
    :func:`napari_diffcut.core.ncut.fiedler_vector`).

    Returns
    -------
    fiedler : torch.Tensor of float64, shape (B, s)
        0 on padding.
    eigenvalue : torch.Tensor of float64, shape (B,)
        lambda_2 of the normalised Laplacian, ``1 - u_2^T M u_2``.
    """
    op = DeflatedBlocks.from_blocks(batch.blocks, batch.degree)
    width = batch.blocks.shape[-1]
    start = start_vectors(batch.sizes, width, seed).to(batch.blocks.device)
    u2, _, _ = top_eigenvectors(op, start, tol=tol)
    mu2 = (u2 * op.product(u2)).sum(-1)
    z = op.inv_sqrt * u2
    peak = z.gather(1, z.abs().argmax(dim=1, keepdim=True))
    z = torch.where(peak < 0, -z, z)
    return z, 1.0 - mu2


def sweep_cuts(
    batch: BlockBatch, fiedler: torch.Tensor, min_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best NCut split of every block along its sorted Fiedler vector (exact sweep).

    Nodes sorted by decreasing z; ``assoc(A_j)`` grows by ``2 W[o_j, A_{j-1}] +
    W[o_j, o_j]``, ``cut = vol(A) - assoc(A)`` and ``NCut = cut/vol(A) +
    cut/vol(B)`` (Shi & Malik 2000, eq. 2), over all positions with at least
    ``min_size`` nodes per side; the cost of the best one is recomputed with
    the cut summed directly, as :func:`napari_diffcut.core.ncut.sweep_cut` does.

    Returns
    -------
    mask : torch.Tensor of bool, shape (B, s)
        Side A (the largest Fiedler values) in the blocks' node order.
    cost : torch.Tensor of float64, shape (B,)
        Its NCut; ``inf`` where no position respects ``min_size``.
    """
    blocks, valid = batch.blocks, batch.valid
    n_blocks, width = valid.shape
    dev = blocks.device
    key = torch.where(valid, -fiedler, torch.full_like(fiedler, float("inf")))
    order = torch.sort(key, dim=1, stable=True).indices  # argsort(-z, kind="stable")
    positions = torch.arange(width, device=dev).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    # earlier[j] = sum_{i < j} W[o_j, o_i]: each node's weight to the nodes ranked
    # before it, without permuting the block (a gather of W costs 10x more on the CPU).
    before = rank[:, None, :] < rank[:, :, None]
    earlier = row_sums(torch.where(before, blocks, torch.zeros((), dtype=blocks.dtype, device=dev)))
    del before
    earlier = earlier.gather(1, order)
    diagonal = blocks.diagonal(dim1=1, dim2=2).gather(1, order).to(torch.float64)
    assoc = torch.cumsum(2.0 * earlier + diagonal, dim=1)
    vol_a = torch.cumsum(batch.degree.gather(1, order), dim=1)
    vol_b = vol_a[:, -1:] - vol_a
    cut = vol_a - assoc
    counts = torch.as_tensor(batch.sizes, device=dev)[:, None]
    position = torch.arange(1, width + 1, device=dev)[None, :]
    ok = (position >= min_size) & (counts - position >= min_size) & (vol_b > 0)
    ncut = torch.where(ok, cut / vol_a + cut / vol_b, torch.full_like(cut, float("inf")))
    best = ncut.argmin(dim=1, keepdim=True)  # first minimum, like numpy
    mask = torch.zeros_like(valid).scatter_(1, order, position <= best + 1) & valid
    # Exact cost: cut = sum_{i in A} (W 1_B)_i, non-negative terms only (core.ncut._split_cost).
    side_b = (valid & ~mask).to(blocks.dtype)
    to_b = block_product(blocks, side_b)
    cut_best = (to_b * mask).sum(dim=-1)
    va, vb = vol_a.gather(1, best).squeeze(1), vol_b.gather(1, best).squeeze(1)
    cost = (cut_best / va + cut_best / vb).clamp(min=0.0)
    found = ok.any(dim=1)
    cost = torch.where(found, cost, torch.full_like(cost, float("inf")))
    return mask & found[:, None], cost


def bipartition_torch(
    affinity: torch.Tensor, *, min_size: int = 1, seed: int = 0, tol: float = 1e-8
) -> Bipartition:
    """Split one graph in two by Normalized Cut, in torch (see ``core.ncut.bipartition``).

    Parameters
    ----------
    affinity : torch.Tensor, shape (n, n)
        Symmetric, non-negative W with positive row sums, on any device.
    min_size : int
        Minimum number of nodes on each side.
    seed : int
        Seed of the start vector.
    tol : float
        Lanczos tolerance (:func:`napari_diffcut.accel.lanczos.top_eigenvectors`).

    Returns
    -------
    Bipartition
        The numpy path's result type (numpy arrays).

    Examples
    --------
    >>> w = torch.kron(torch.eye(2), torch.ones(3, 3)) + 0.01
    >>> b = bipartition_torch(w)
    >>> sorted(b.mask.tolist()) == [False] * 3 + [True] * 3, round(b.cost, 3)
    (True, 0.02)
    """
    n = affinity.shape[0]
    batch = gather_blocks(affinity, [np.arange(n)])
    z, lam = fiedler_vectors(batch, seed=seed, tol=tol)
    mask, cost = sweep_cuts(batch, z, min_size)
    return Bipartition(
        mask=mask[0].cpu().numpy(),
        cost=float(cost[0]),
        eigenvalue=float(lam[0]),
        fiedler=z[0].cpu().numpy(),
    )
