"""Attention-capture overhead: a UNet forward with capture / the same forward without.

Full SD 1.5 UNet configuration (random weights are fine: the cost does not
depend on the values), 512 x 512 input (64 x 64 latent), fp32, batch 1, on
CPU by default. The default processor is diffusers' ``AttnProcessor2_0``
(PyTorch SDPA). Forwards are interleaved (default, capture, default, ...) so
that a change in machine load hits both sides; the ratio is the median of
the per-pair ratios.

Run alone: ``python benchmarks/bench_capture.py --model /tmp/sd15-random``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from bench_common import Timing, load_average, time_call


def unet_forward_times(
    model: Any, pairs: int, *, latent: int = 64, factors: set[int] | None = None
) -> dict[str, Any]:
    """Interleaved default / capture UNet forwards; ratio = median of pair ratios."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from napari_diffcut.attention.capture import AttentionSink, capture_self_attention

    unet = model.unet
    unet.set_attn_processor(AttnProcessor2_0())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, latent, latent), generator=gen).to(model.device, model.dtype)
    t = torch.tensor([300], device=model.device)
    cond = model.unet_kwargs((latent, latent))  # SDXL-class: also pooled embedding, time ids

    def default() -> Any:
        return unet(x, t, **cond).sample

    def capture() -> Any:
        sink = AttentionSink((latent, latent), factors=factors)
        with capture_self_attention(unet, sink):
            return unet(x, t, **cond).sample

    base, capt = Timing(), Timing()
    load_before = load_average()
    with torch.no_grad():
        _, ref = time_call(default)  # warm-up (allocator, oneDNN kernels)
        _, out = time_call(capture)
        max_diff = float((out.float() - ref.float()).abs().max())
        for _ in range(pairs):
            for timing, fn in ((base, default), (capt, capture)):
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds, _ = time_call(fn)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                timing.samples.append(seconds)
    ratios = [c / b for b, c in zip(base.samples, capt.samples, strict=True)]
    return {
        "capture_overhead": statistics.median(ratios),
        "capture_overhead_of_min": capt.min / base.min,
        "pair_ratios": ratios,
        "unet_default_s": base.as_dict(),
        "unet_capture_s": capt.as_dict(),
        "max_abs_output_diff": max_diff,
        "load_avg": [load_before, load_average()],
    }


def main() -> None:
    """Command line: print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/sd15-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    from napari_diffcut.attention.model import load_model

    model = load_model(args.model, device=args.device, dtype="auto")
    print(json.dumps(unet_forward_times(model, args.pairs), indent=1))


if __name__ == "__main__":
    main()
