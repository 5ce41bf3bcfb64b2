"""Diffuse, part 1: capture self-attention probabilities from a diffusers UNet.

diffusers' default processor (PyTorch SDPA) never materialises the softmax
probabilities. :class:`CaptureAttnProcessor` is installed on the self-attention
(``attn1``) modules only. It computes the same output as the default processor
and, as a side effect, adds the head-averaged probabilities into one fp32
accumulator per attention grid (method.md 2.3). Per-head and per-layer maps are
never kept.

Speed and memory (benchmarks/NOTES.md): scores are computed for blocks of
query rows across all heads (16 MiB on CPU) into buffers allocated once per
layer; the softmax runs in place, the probabilities are reused for the output
(no second SDPA pass) and their head sum goes straight into the grid's fp32
accumulator. Transient memory is bounded by the block size whatever the token
count (computing one head at a time needs 2 GiB per layer at 16384 tokens),
and the time is that of the best head-chunked variant: about 1.1x the default
processor for a whole SD 1.5 UNet forward at 512 x 512 on CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F


class AttentionSink:
    """Per-grid accumulators of head-averaged self-attention probabilities.

    Parameters
    ----------
    latent_shape : (h, w)
        Latent grid of the current UNet input; attention grids are found from
        the token count (``h/f * w/f`` tokens at downsampling factor ``f``).
    factors : set of int, optional
        Downsampling factors to capture (1 = latent grid). None captures all.
    chunk_bytes : int, optional
        Bound on the fp32 score buffer of one block of query rows (all heads).
        None picks a per-device default (:meth:`chunk_bytes_for`).
    on_layer : callable, optional
        Called after each captured layer (progress and cancellation checks).
    stop_after : int, optional
        When the UNet's output is not needed (fast mode): the number of layers
        one call captures. The last of them computes its probabilities only
        and raises :class:`CaptureComplete`, so the rest of the forward pass
        (that layer's output, the feed-forward and cross-attention after it,
        the output convolutions) is skipped.
    """

    def __init__(
        self,
        latent_shape: tuple[int, int],
        factors: set[int] | None = None,
        chunk_bytes: int | None = None,
        on_layer: Callable[[], None] | None = None,
        stop_after: int | None = None,
    ) -> None:
        self.latent_shape = latent_shape
        self.factors = factors
        self.chunk_bytes = chunk_bytes
        self.on_layer = on_layer
        self.stop_after = stop_after
        self.captured = 0
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], int] = {}

    def chunk_bytes_for(self, device: torch.device) -> int:
        """Bound on one fp32 score block: ``chunk_bytes``, else a per-device default.

        16 MiB on CPU keeps a block in the last-level cache between the passes
        over it; 256 MiB on accelerators, where fewer, larger kernels are faster.
        """
        if self.chunk_bytes is not None:
            return max(1, int(self.chunk_bytes))
        return CPU_CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES

    def grid_for(self, n_tokens: int) -> tuple[tuple[int, int], int]:
        """Grid (h, w) and factor f of a layer with ``n_tokens`` query tokens."""
        lh, lw = self.latent_shape
        f = round(math.sqrt(lh * lw / n_tokens))
        if f < 1 or lh % f or lw % f or (lh // f) * (lw // f) != n_tokens:
            raise RuntimeError(
                f"cannot place {n_tokens} attention tokens on latent grid {self.latent_shape}"
            )
        return (lh // f, lw // f), f

    def wants(self, n_tokens: int) -> bool:
        """Whether a layer with this many tokens is captured."""
        _, f = self.grid_for(n_tokens)
        return self.factors is None or f in self.factors

    def add(self, grid: tuple[int, int], probs_sum: torch.Tensor, n_maps: int) -> None:
        """Add a sum of ``n_maps`` probability maps (Nq, Nk) for one layer call."""
        mean = probs_sum / n_maps
        if grid in self.sums:
            self.sums[grid] += mean
            self.counts[grid] += 1
        else:
            self.sums[grid] = mean.to(torch.float32).clone()
            self.counts[grid] = 1

    def accumulator(
        self, grid: tuple[int, int], shape: tuple[int, int], device: torch.device
    ) -> torch.Tensor:
        """The fp32 sum buffer of ``grid`` (zeros on first use), for in-place adds.

        A caller adds the head mean of one layer call into it and then calls
        :meth:`count`; :meth:`add` does both for a finished sum.
        """
        if grid not in self.sums:
            self.sums[grid] = torch.zeros(shape, dtype=torch.float32, device=device)
            self.counts[grid] = 0
        return self.sums[grid]

    def count(self, grid: tuple[int, int]) -> None:
        """Record one more layer call added into ``grid``'s accumulator."""
        self.counts[grid] = self.counts.get(grid, 0) + 1

    def first_buffer(
        self, grid: tuple[int, int], shape: tuple[int, int], device: torch.device
    ) -> torch.Tensor | None:
        """An uninitialised fp32 accumulator for ``grid``'s first layer, else None.

        The caller writes every row of it (the head mean of that first layer):
        no zero fill of an N x N buffer (64 MiB at 4096 tokens). None means
        the grid has its buffer already; add into :meth:`accumulator`.
        """
        if grid in self.sums:
            return None
        buf = self.sums[grid] = torch.empty(shape, dtype=torch.float32, device=device)
        self.counts[grid] = 0
        return buf

    def completes_with_next(self) -> bool:
        """Whether the next captured layer is the last one :attr:`stop_after` asks for."""
        return self.stop_after is not None and self.captured + 1 >= self.stop_after

    def means(self) -> dict[tuple[int, int], torch.Tensor]:
        """Layer- and step-averaged attention per grid."""
        return {g: s / self.counts[g] for g, s in self.sums.items()}


class CaptureComplete(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the last layer an :class:`AttentionSink` with ``stop_after`` needs.

    The caller of the UNet catches it (:func:`napari_diffcut.attention.diffuse.iter_attention`,
    fast mode); :func:`capture_self_attention` restores the processors either way.
    """


class CaptureAttnProcessor:
    """Self-attention processor that also records head-mean probabilities.

    Follows the computation of diffusers' ``AttnProcessor2_0`` for
    self-attention (spatial/group norm, q/k/v projections, optional q/k norms,
    ``1/sqrt(d)`` scaling, output projection, residual, rescale), with the
    scores and the softmax in fp32 (method.md 11: fp16 overflows otherwise).
    """

    def __init__(self, sink: AttentionSink) -> None:
        self.sink = sink

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        capture = (
            attention_mask is None and encoder_hidden_states is None and self.sink.wants(seq_len)
        )
        if capture and self.sink.completes_with_next():
            # Nothing downstream is needed: probabilities only, then stop the forward.
            self._attend_and_capture(query, key, value, seq_len, need_output=False)
            self.sink.captured += 1
            if self.sink.on_layer is not None:
                self.sink.on_layer()
            raise CaptureComplete
        if capture:
            out = self._attend_and_capture(query, key, value, seq_len)
            self.sink.captured += 1
        else:
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
                attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        if capture and self.sink.on_layer is not None:
            self.sink.on_layer()
        return out

    def _attend_and_capture(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        seq_len: int,
        need_output: bool = True,
    ) -> torch.Tensor | None:
        """Explicit attention in blocks of query rows; add head-mean probabilities to the sink.

        Each block holds all heads and all keys: scores ``q k^T / sqrt(d)`` in
        fp32 into a reused buffer, softmax in place, the output block
        ``probs @ v`` (skipped when ``need_output`` is False; None is then
        returned) and the head sum, which goes straight into the grid's fp32
        accumulator scaled by ``1 / (batch * heads)``.
        """
        batch, heads, n_q, head_dim = query.shape
        n_k = key.shape[2]
        grid, _ = self.sink.grid_for(seq_len)
        # The grid's first layer writes its buffer instead of adding into zeros:
        # fl(0 + a * s) = fl(a * s), so the sums are bitwise the same.
        first = self.sink.first_buffer(grid, (n_q, n_k), query.device)
        acc = first if first is not None else self.sink.accumulator(grid, (n_q, n_k), query.device)
        budget = self.sink.chunk_bytes_for(query.device)
        rows = _block_rows(n_q, budget // max(1, batch * heads * n_k * 4))
        # q, k, v arrive as strided views of (batch, tokens, heads, dim); one
        # contiguous copy each keeps every block's matmul on the fast path
        # (benchmarks/NOTES.md). Scaling the keys once is cheaper than scaling
        # every score block.
        keys_t = (key.float() * (1.0 / math.sqrt(head_dim))).transpose(-1, -2).contiguous()
        queries = query.float().contiguous()
        value = value.contiguous()
        # Every buffer of the loop is allocated once: per-block allocations that
        # outlive each other fragment the heap and grew RSS by the size of the
        # accumulator at 16384 tokens (benchmarks/NOTES.md).
        dev = query.device
        scores = torch.empty((batch, heads, rows, n_k), dtype=torch.float32, device=dev)
        head_sum = torch.empty((rows, n_k), dtype=torch.float32, device=dev)
        out = out_block = None
        if need_output:
            out = torch.empty((batch, heads, n_q, head_dim), dtype=value.dtype, device=dev)
            out_block = torch.empty((batch, heads, rows, head_dim), dtype=value.dtype, device=dev)
        inv_maps = 1.0 / (batch * heads)
        for start in range(0, n_q, rows):
            size = min(n_q, start + rows) - start
            block = scores if size == rows else scores[:, :, :size]
            torch.matmul(queries[:, :, start : start + size], keys_t, out=block)
            probs = _softmax_(block)
            if out is not None and out_block is not None:
                result = out_block if size == rows else out_block[:, :, :size]
                torch.matmul(probs.to(value.dtype), value, out=result)
                out[:, :, start : start + size].copy_(result)
            if first is not None:
                torch.sum(probs, dim=(0, 1), out=first[start : start + size])
                first[start : start + size].mul_(inv_maps)
                continue
            part = head_sum if size == rows else head_sum[:size]
            torch.sum(probs, dim=(0, 1), out=part)
            acc[start : start + size].add_(part, alpha=inv_maps)
        self.sink.count(grid)
        return out


#: Score block bound on CPU (fits the last-level cache; see benchmarks/NOTES.md).
CPU_CHUNK_BYTES = 16 << 20
#: Score block bound on CUDA/MPS.
DEVICE_CHUNK_BYTES = 256 << 20


def _block_rows(n_q: int, fit: int) -> int:
    """Rows per block: the largest power of two <= ``fit`` (>= 1), at most ``n_q``.

    A power of two divides the token counts of every grid, so no short last block.
    """
    fit = max(1, min(n_q, fit))
    return 1 << (fit.bit_length() - 1)


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place on CPU (one buffer fewer)."""
    if scores.device.type == "cpu" and scores.is_contiguous():
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return torch.softmax(scores, dim=-1)


def self_attention_names(unet: Any) -> list[str]:
    """Processor keys of the self-attention (``attn1``) modules of a UNet."""
    return [name for name in unet.attn_processors if ".attn1." in f".{name}"]


def self_attention_factors(unet: Any) -> dict[str, int]:
    """Downsampling factor (relative to the latent grid) of each ``attn1`` module.

    Read from the module tree, not from a table of known checkpoints: the
    factor doubles after each down block with a downsampler and halves after
    each up block with an upsampler, and the mid block sits at the coarsest
    factor. SD 1.x/2.x give factors 1, 2, 4, 8; SDXL, SSD-1B and Segmind Vega
    put no attention in their first down block (``DownBlock2D``) and last up
    block (``UpBlock2D``), so they have only 2 and 4 (method.md 2.1).

    Returns
    -------
    dict of str to int
        Processor key (as in :func:`self_attention_names`) to factor.
    """
    block_factor: dict[str, int] = {}
    f = 1
    for i, block in enumerate(getattr(unet, "down_blocks", [])):
        block_factor[f"down_blocks.{i}."] = f
        if getattr(block, "downsamplers", None):
            f *= 2
    block_factor["mid_block."] = f
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        block_factor[f"up_blocks.{i}."] = f
        if getattr(block, "upsamplers", None):
            f = max(1, f // 2)
    out: dict[str, int] = {}
    for name in self_attention_names(unet):
        prefix = next((p for p in block_factor if name.startswith(p)), None)
        if prefix is None:
            raise RuntimeError(f"cannot place self-attention module {name!r} in the UNet")
        out[name] = block_factor[prefix]
    return out


def attention_factors(unet: Any) -> tuple[int, ...]:
    """Sorted downsampling factors at which a UNet has self-attention."""
    return tuple(sorted(set(self_attention_factors(unet).values())))


def captured_layer_count(unet: Any, factors: set[int] | None = None) -> int:
    """Self-attention layers one UNet call captures at ``factors`` (None: all of them)."""
    return sum(1 for f in self_attention_factors(unet).values() if factors is None or f in factors)


@contextlib.contextmanager
def capture_self_attention(unet: Any, sink: AttentionSink) -> Iterator[AttentionSink]:
    """Install :class:`CaptureAttnProcessor` on ``attn1`` modules for the block.

    The original processors are restored on exit, also when an exception is
    raised inside the block. Cross-attention (``attn2``) is left alone.
    """
    original = dict(unet.attn_processors)
    names = set(self_attention_names(unet))
    if not names:
        raise RuntimeError("this UNet has no self-attention (attn1) modules to capture")
    processor = CaptureAttnProcessor(sink)
    unet.set_attn_processor(
        {name: (processor if name in names else proc) for name, proc in original.items()}
    )
    try:
        yield sink
    finally:
        unet.set_attn_processor(original)
