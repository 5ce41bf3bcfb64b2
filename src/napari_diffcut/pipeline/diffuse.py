"""The diffuse stage: load the model, encode, run the UNet with attention capture.

The UNet runs in a helper thread so that the generator can yield a progress
event per captured attention layer and stop within one layer when closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.budget import require_graph_fits
from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.core.image import latent_grid, resize
from napari_diffcut.core.walk import aggregate_attention, check_resolution_weights
from napari_diffcut.pipeline.engine import ModelCache
from napari_diffcut.pipeline.settings import Progress, Settings


def diffuse_stage(
    rgb: NDArray[np.float32],
    s: Settings,
    engine: ModelCache,
    record: dict[str, Any],
    image_shape: tuple[int, int] | None = None,
    post_device: Any = None,
) -> Generator[Progress, None, tuple[tuple[int, int], Any]]:
    """Load the model, encode, run the UNet with capture, aggregate attention.

    ``image_shape`` is the label image's size when ``rgb`` was shrunk already
    (it sets the latent grid's aspect); ``s.working_size`` overrides the
    checkpoint's native working size. Returns the patch grid and P: a float32
    ndarray, or with a torch ``post_device`` a float32 tensor there (the
    attention stays on the model's device and is aggregated in torch).
    """
    yield Progress("load", 0, 1, f"loading {s.model}")
    model = engine.model_for(s)
    # Weights are checked against the grids the UNet really has before it runs (issue 14).
    factor_weights = check_resolution_weights(s.resolution_weights, model.attention_factors)
    latent = (
        s.working_size // model.vae_scale_factor if s.working_size else model.native_latent
    )
    # The graph lives on the finest attention grid: the latent grid for SD 1.x/2.x,
    # half of it for SDXL-class UNets (no self-attention at the latent grid).
    pf = model.patch_factor
    grid = latent_grid(image_shape or rgb.shape[:2], max(1, latent // pf), max(1, 8 // pf))
    latent_hw = (grid[0] * pf, grid[1] * pf)
    vae = model.vae_scale_factor
    # Refused before the image is encoded or any N x N matrix exists (issue 12).
    require_graph_fits(grid, (latent_hw[0] * vae, latent_hw[1] * vae))
    record.update(
        device_used=str(model.device),
        dtype_used=str(model.dtype).replace("torch.", ""),
        working_size=[latent_hw[0] * model.vae_scale_factor, latent_hw[1] * model.vae_scale_factor],
    )
    yield Progress("encode", 0, 1, f"VAE encode at {record['working_size']}")
    from napari_diffcut.attention.diffuse import encode

    work = resize(rgb, tuple(record["working_size"]))
    latents = encode(model, work)
    factors = {f for f, w in factor_weights.items() if w > 0}
    torch_post = post_device is not None
    per_res = yield from _attention_in_thread(model, latents, s, factors, torch_post)
    weights = {(latent_hw[0] // f, latent_hw[1] // f): w for f, w in factor_weights.items()}
    record["attention_grids"] = [list(g) for g in sorted(per_res, reverse=True)]
    if torch_post:
        from napari_diffcut.accel.walk import aggregate_attention_torch

        return grid, aggregate_attention_torch(
            per_res, weights, fine_grid=grid, device=post_device
        )
    return grid, aggregate_attention(per_res, weights, fine_grid=grid)


class _Cancelled(Exception):  # noqa: N818 - a private control-flow signal
    """Raised inside the UNet forward when the consumer closed the generator."""


def _attention_in_thread(
    model: Any, latents: Any, s: Settings, factors: set[int] | None, keep_on_device: bool = False
) -> Generator[Progress, None, dict[tuple[int, int], Any]]:
    """Run the UNet in a helper thread so that progress can be yielded per layer.

    The helper reports each captured layer through a queue; when the generator
    is closed, a flag makes the next captured layer raise, which aborts the
    forward pass within one attention layer.
    """
    from napari_diffcut.attention.capture import captured_layer_count
    from napari_diffcut.attention.diffuse import iter_attention

    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    cancel = threading.Event()
    n_layers = captured_layer_count(model.unet, factors)
    calls = 1 if s.mode == "fast" else s.steps

    def on_layer() -> None:
        if cancel.is_set():
            raise _Cancelled
        events.put(("layer", None))

    def target() -> None:
        try:
            gen = iter_attention(
                model, latents, mode=s.mode, timestep=s.timestep, steps=s.steps,
                noise=s.noise, seed=s.seed, factors=factors, on_layer=on_layer,
                keep_on_device=keep_on_device,
            )
            while True:
                try:
                    events.put(("step", next(gen)))
                except StopIteration as stop:
                    events.put(("done", stop.value))
                    return
        except BaseException as exc:  # noqa: BLE001 - relayed to the consumer
            events.put(("error", exc))

    worker = threading.Thread(target=target, name="napari-diffcut-unet", daemon=True)
    worker.start()
    layers = 0
    try:
        while True:
            kind, value = events.get()
            if kind == "layer":
                layers += 1
                yield Progress("diffuse", layers, n_layers * calls,
                               f"attention layer {layers} of ~{n_layers * calls}")
            elif kind == "step":
                yield Progress("diffuse", layers, n_layers * calls,
                               f"UNet call {value[0]} of {value[1]}")
            elif kind == "done":
                return value
            else:
                if isinstance(value, _Cancelled):
                    raise DiffCutError("run cancelled")
                raise value
    finally:
        cancel.set()
        worker.join()
