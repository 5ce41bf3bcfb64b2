"""CPU precision and layout: stage times and segmentation agreement, fp32 vs bf16 (issue 14).

Full SD 1.5 configuration (random weights: the real compute cost), 512 x 512,
fast mode, on the CPU. For each variant (dtype x memory format) the model is
loaded once (not timed), then per repeat: VAE encode, the UNet forward with
capture, and one end-to-end ``segment`` call on the warm engine (encode, UNet,
walk, NCut tree, pixel labels). Agreement with the fp32 run: the adjusted
Rand index (ARI) of the labels on a fixed synthetic image and the median
relative L1 difference of the attention rows.

bf16 is only fast where the CPU has native bf16 (AVX512-BF16 or AMX; Arm
BF16): elsewhere oneDNN emulates it. ``cpu_has_native_bf16`` is recorded, and
``dtype="auto"`` picks bf16 only when it is True.

Run alone: ``python benchmarks/bench_cpu_dtype.py --model /tmp/sd15-random``
(``--variants float32,bfloat16,float32-cl`` by default; ``-cl`` = channels-last
VAE and UNet).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
from bench_common import Timing, load_average, machine, time_call


def fixed_image(size: int = 512) -> np.ndarray:
    """Deterministic RGB test image: background gradient, three discs, a bar."""
    yy, xx = np.mgrid[:size, :size] / size
    img = np.stack([0.2 + 0.3 * xx, 0.3 + 0.2 * yy, 0.4 * np.ones_like(xx)], -1)
    for cy, cx, r, col in [
        (0.3, 0.3, 0.15, (0.9, 0.2, 0.2)),
        (0.65, 0.7, 0.2, (0.2, 0.8, 0.3)),
        (0.75, 0.25, 0.1, (0.9, 0.9, 0.2)),
    ]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = col
    img[int(0.05 * size) : int(0.12 * size), int(0.5 * size) : int(0.95 * size)] = (0.1, 0.1, 0.6)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI of two label images (Hubert & Arabie 1985), from the contingency table."""
    _, ia = np.unique(a.ravel(), return_inverse=True)
    _, ib = np.unique(b.ravel(), return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), np.int64)
    np.add.at(table, (ia, ib), 1)

    def pairs(x: np.ndarray) -> float:
        x = x.astype(np.float64)
        return float((x * (x - 1) / 2).sum())

    n = a.size
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2)
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def run_variant(model_dir: str, variant: str, repeats: int, image: np.ndarray) -> dict[str, Any]:
    """Stage timings, labels and attention maps of one variant."""
    import torch

    from napari_diffcut.attention.diffuse import encode, iter_attention
    from napari_diffcut.large.dispatch import DiffCutEngine
    from napari_diffcut.pipeline.settings import make_settings

    dtype, _, layout = variant.partition("-")
    settings = make_settings(model=model_dir, device="cpu", dtype=dtype, seed=0)
    engine = DiffCutEngine()
    model = engine.model_for(settings)
    if layout == "cl":
        model.vae.to(memory_format=torch.channels_last)
        model.unet.to(memory_format=torch.channels_last)
    rgb = image.astype(np.float32) / 255

    def unet_only(latents: Any) -> Any:
        gen = iter_attention(model, latents)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    enc, unet, e2e = Timing(), Timing(), Timing()
    load = [load_average()]
    seg = attention = None
    with torch.no_grad():
        for _ in range(repeats):
            seconds, latents = time_call(lambda: encode(model, rgb))
            enc.samples.append(seconds)
            seconds, attention = time_call(lambda latents=latents: unet_only(latents))
            unet.samples.append(seconds)
            seconds, seg = time_call(lambda: engine.segment(image, settings))
            e2e.samples.append(seconds)
    load.append(load_average())
    return {
        "dtype_used": str(model.dtype).replace("torch.", ""),
        "vae_dtype": str(model.vae_dtype).replace("torch.", ""),
        "vae_encode_s": enc.as_dict(),
        "unet_capture_s": unet.as_dict(),
        "end_to_end_s": e2e.as_dict(),
        "segments": int(len(np.unique(seg.labels))) if seg is not None else None,
        "load_avg": load,
        "_labels": seg.labels if seg is not None else None,
        # Random weights give structureless attention, so the automatic cut keeps one
        # segment: the deepest cut (threshold 1) compares the partitions themselves.
        "_deep": seg.cut(1.0) if seg is not None else None,
        "_attention": attention,
    }


def main() -> None:
    """Command line: print the result as JSON (``--json`` also writes it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/sd15-random")
    parser.add_argument("--variants", default="float32,bfloat16,float32-cl,bfloat16-cl")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    from napari_diffcut.attention.devices import cpu_has_native_bf16, resolve_dtype

    image = fixed_image()
    results: dict[str, Any] = {}
    for variant in args.variants.split(","):
        results[variant] = res = run_variant(args.model, variant, args.repeats, image)
        print(  # partial results survive an interrupted run
            f"{variant}: vae {res['vae_encode_s']['min']:.2f} s, unet "
            f"{res['unet_capture_s']['min']:.2f} s, end to end {res['end_to_end_s']['min']:.2f} s, "
            f"load {res['load_avg']}",
            file=sys.stderr,
            flush=True,
        )
    ref = results.get("float32")
    for res in results.values():
        if ref is not None and res["_labels"] is not None:
            res["ari_vs_float32"] = adjusted_rand_index(ref["_labels"], res["_labels"])
            res["ari_deep_cut_vs_float32"] = adjusted_rand_index(ref["_deep"], res["_deep"])
            res["deep_cut_segments"] = int(len(np.unique(res["_deep"])))
            rel = []
            for grid, a in ref["_attention"].items():
                b = res["_attention"][grid]
                rel.append(float(np.median(np.abs(b - a).sum(1) / a.sum(1))))
            res["attention_rel_l1_vs_float32"] = max(rel)
    for res in results.values():
        res.pop("_labels")
        res.pop("_deep")
        res.pop("_attention")
    out = {
        "machine": machine(),
        "cpu_has_native_bf16": cpu_has_native_bf16(),
        "auto_dtype_on_cpu": str(resolve_dtype("auto", torch.device("cpu"))),
        "image": "fixed_image(512), fast mode, default settings",
        "variants": results,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
