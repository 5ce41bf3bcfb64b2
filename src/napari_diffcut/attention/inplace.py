"""Inference forwards that allocate less: diffusers' ResNet blocks with in-place steps.

diffusers' ``ResnetBlock2D.forward`` allocates a new tensor for every step:
group norm, SiLU, convolution, the time-embedding add, group norm, SiLU,
convolution, the residual add and the division by ``output_scale_factor``
(1.0 in every SD, SDXL and VAE config). At 512 px the VAE encoder's first
blocks hold 512 x 512 x 128 activations, 64 MiB each in bf16, which glibc
serves with fresh ``mmap`` pages: the encode touched ~2 GB of new memory per
run, and the page faults cost more than a second of kernel time on 2 cores
(benchmarks/NOTES.md, "Model side on the CPU").

:class:`InplaceResnetBlock2D` computes the same values in the same order
with the SiLUs, the time-embedding add and the residual add done in place
and the division skipped when the factor is 1: four allocations per block
instead of eight or nine (five where the residual's layouts differ, below),
and bitwise the same output (tested against the stock forward on whole
UNets and VAEs, fp32 and bf16, channels-last). Blocks this forward does not cover
(up/down-sampling resnets, "scale_shift" time norms, other activations,
training mode) run the stock forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D


class InplaceResnetBlock2D(ResnetBlock2D):
    """``ResnetBlock2D`` whose inference forward reuses its own buffers.

    Installed on loaded blocks by :func:`use_inplace_resnets` (the class of
    each instance is swapped; parameters and buffers are untouched).
    """

    def forward(  # type: ignore[override]
        self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        # A temb without time_emb_proj is added raw by the stock forward: left to it.
        raw_temb = temb is not None and self.time_emb_proj is None
        if raw_temb or not self._inplace_ok() or args or kwargs.get("scale") is not None:
            return super().forward(input_tensor, temb, *args, **kwargs)
        h = F.silu(self.norm1(input_tensor), inplace=True)
        h = self.conv1(h)
        if temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            h.add_(self.time_emb_proj(temb)[:, :, None, None])
        h = F.silu(self.norm2(h), inplace=True)
        # self.dropout is the identity in eval mode (checked by _inplace_ok).
        h = self.conv2(h)
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        # Stock: (shortcut + h) / factor. fl(a + b) = fl(b + a) and x / 1.0 = x, so
        # adding into h is bitwise the same when both have one layout. With mixed
        # layouts (an NCHW input from a transformer block, a channels-last
        # convolution output) the stock sum takes the input's layout, and the next
        # layers' kernels, hence their rounding, depend on it: keep the stock sum.
        out = h.add_(shortcut) if shortcut.stride() == h.stride() else shortcut + h
        if self.output_scale_factor != 1.0:
            out.div_(self.output_scale_factor)
        return out

    def _inplace_ok(self) -> bool:
        """Whether this block's computation is the one the in-place forward covers."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and self.upsample is None
            and self.downsample is None
            and self.time_embedding_norm == "default"
            and isinstance(self.nonlinearity, torch.nn.SiLU)
        )


def use_inplace_resnets(model: torch.nn.Module) -> int:
    """Give every stock ``ResnetBlock2D`` of ``model`` the in-place forward.

    Returns
    -------
    int
        Number of blocks switched.
    """
    switched = 0
    for module in model.modules():
        if type(module) is ResnetBlock2D:
            module.__class__ = InplaceResnetBlock2D
            switched += 1
    return switched
