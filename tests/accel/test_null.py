"""The locality null in torch equals the numpy core's: kernel, dense W0, tree null costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffcut.accel.null import null_affinity_torch, offset_kernel_torch
from napari_diffcut.accel.tree import device_null
from napari_diffcut.core.null import null_affinity, null_model, offset_kernel
from napari_diffcut.core.walk import walk_affinity


def test_kernel_and_null_graph_match_numpy(planted: tuple) -> None:
    grid, _, p = planted
    w = walk_affinity(p, dtype=np.float32)
    ref = offset_kernel(w, grid)
    out = offset_kernel_torch(torch.from_numpy(w), grid)
    assert out.dtype == torch.float64 and tuple(out.shape) == ref.shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(null_affinity_torch(out, grid).numpy(), null_affinity(ref, grid))


def test_device_null_gives_the_numpy_cut_costs(planted: tuple) -> None:
    grid, regions, p = planted
    w = walk_affinity(p, dtype=np.float32)
    model, dense = device_null(torch.from_numpy(w), grid)
    ref = null_model(w, grid)
    np.testing.assert_array_equal(dense.numpy(), ref.dense)
    side = (regions == 0).ravel()
    assert model.ncut(side, ~side) == pytest.approx(ref.ncut(side, ~side), rel=1e-12)


def test_kernel_checks_the_grid() -> None:
    with pytest.raises(ValueError, match="does not match"):
        offset_kernel_torch(torch.ones(6, 6), (2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_null_on_cuda_matches_cpu(planted: tuple) -> None:
    grid, _, p = planted
    w = torch.from_numpy(walk_affinity(p, dtype=np.float32))
    ref = offset_kernel_torch(w, grid)
    out = offset_kernel_torch(w.cuda(), grid)
    assert out.device.type == "cuda"
    np.testing.assert_allclose(out.cpu().numpy(), ref.numpy(), rtol=1e-10, atol=1e-15)
