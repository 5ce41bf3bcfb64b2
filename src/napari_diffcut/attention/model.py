"""Load a Stable Diffusion checkpoint: only the parts the method needs.

UNet, VAE and the scheduler config are kept; the text encoder and tokenizer are
loaded once to make the empty-prompt embedding, which is cached, and then
dropped. ``model`` is a Hugging Face repo id or a local folder in diffusers
layout. ``HF_HUB_OFFLINE=1`` and the Hugging Face cache are honoured (diffusers
and huggingface_hub read them). Weights load from safetensors only, unless the
caller explicitly allows pickled ``.bin`` weights (they can run code on load).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from napari_diffcut.core.errors import DiffCutError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

#: Empty-prompt embeddings, keyed by (model, revision, dtype, device).
_EMBEDDING_CACHE: dict[tuple[str, str | None, str, str], torch.Tensor] = {}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; other strings are checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffCutError(
            f"device={device!r} was asked for but CUDA is not available here; "
            "use device='auto' or 'cpu'"
        )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise DiffCutError(f"device={device!r} was asked for but MPS is not available here")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"``: float16 on CUDA, float32 elsewhere; or "float16"/"bfloat16"/"float32"."""
    table = {
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


@dataclass
class LoadedModel:
    """The parts of a Stable Diffusion pipeline used by the method."""

    name: str
    unet: Any
    vae: Any
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    steps_offset: int
    empty_embedding: torch.Tensor
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixel size of one latent cell (8 for SD 1.x/2.x)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def native_latent(self) -> int:
        """Native latent side (UNet ``sample_size``: 64 for SD 1.5)."""
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def native_size(self) -> int:
        """Native working size in pixels (512 for SD 1.5)."""
        return self.native_latent * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        """VAE latent scaling factor (0.18215 for SD 1.x)."""
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))


def _looks_like_path(model: str) -> bool:
    """A folder path rather than a hub repo id ("owner/name")."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") != 1


def _not_found(model: str, exc: BaseException) -> DiffCutError:
    """One clear message: which model, where it was looked for, how to get it."""
    from huggingface_hub.constants import HF_HUB_CACHE

    offline = hub_offline()
    local = Path(model).expanduser()
    if local.exists():
        where = (
            f"the local folder {local.resolve()}, which exists but is not a complete diffusers "
            "model: it needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )
        how = "Point model (--model) at a complete diffusers folder."
    elif _looks_like_path(model):
        where = f"the local folder {local.resolve()}, which does not exist"
        how = "Check the path, or pass a Hugging Face repo id such as " + repr(DEFAULT_MODEL) + "."
    else:
        where = (
            f"a local folder {local.resolve()} (not found) and the Hugging Face cache "
            f"{HF_HUB_CACHE}"
            + (" (HF_HUB_OFFLINE is set, so nothing was downloaded)" if offline else "")
        )
        how = (
            "Run once with internet access (it is downloaded to the Hugging Face cache and reused "
            "offline), or download it elsewhere with "
            f"`huggingface-cli download {model} --local-dir DIR`, copy DIR here and pass "
            "it as model=DIR (--model DIR)."
        )
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return DiffCutError(
        f"Could not load model {model!r}. Looked in {where}. {how} "
        f"(Details: {type(exc).__name__}: {detail})"
    )


def _no_safetensors(model: str) -> DiffCutError:
    return DiffCutError(
        f"Model {model!r} has no safetensors weights, only pickled .bin files, which "
        "can run arbitrary code when loaded. Convert it to safetensors, or pass "
        "allow_pickle=True (--allow-pickle) if you trust its source."
    )


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (huggingface_hub reads it only at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _load(cls: Any, model: str, subfolder: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with napari-diffcut's error messages."""
    try:
        return cls.from_pretrained(model, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as exc:
        text = str(exc).lower()
        if "safetensors" in text and kwargs.get("use_safetensors"):
            raise _no_safetensors(model) from exc
        raise _not_found(model, exc) from exc


def empty_prompt_embedding(
    model: str,
    *,
    revision: str | None,
    device: torch.device,
    dtype: torch.dtype,
    use_safetensors: bool | None,
) -> torch.Tensor:
    """Text-encoder output for the empty prompt, cached per model.

    The encoder and tokenizer are loaded, used once and released.
    """
    key = (model, revision, str(dtype), str(device))
    if key in _EMBEDDING_CACHE:
        return _EMBEDDING_CACHE[key]
    from transformers import AutoTokenizer, CLIPTextModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model, subfolder="tokenizer", revision=revision, local_files_only=hub_offline()
        )
    except (OSError, ValueError) as exc:
        raise _not_found(model, exc) from exc
    encoder = _load(
        CLIPTextModel,
        model,
        "text_encoder",
        revision=revision,
        use_safetensors=use_safetensors,
        local_files_only=hub_offline(),
    )
    ids = tokenizer(
        [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        emb = encoder(ids)[0]
    del encoder, tokenizer
    emb = emb.to(device=device, dtype=dtype)
    _EMBEDDING_CACHE[key] = emb
    return emb


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load UNet, VAE, scheduler config and the empty-prompt embedding.

    Parameters
    ----------
    model : str
        Hugging Face repo id or local folder in diffusers layout.
    device : str
        "auto" (cuda > mps > cpu), "cpu", "cuda", "cuda:N", "mps".
    dtype : str
        "auto" (fp16 on CUDA, else fp32), "float16", "bfloat16", "float32".
    revision : str, optional
        Git revision of a hub model.
    allow_pickle : bool
        Accept pickled ``.bin`` weights when a model has no safetensors.

    Raises
    ------
    DiffCutError
        Model not found (with where it was looked for and how to get it), or
        no safetensors weights and ``allow_pickle`` is False.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    if not isinstance(model, str | os.PathLike) or not str(model):
        raise ValueError(f"model must be a repo id or a folder path, got {model!r}")
    model = str(model)
    if _looks_like_path(model) and not Path(model).expanduser().exists():
        # A folder path that does not exist: fail at once instead of asking the hub.
        raise _not_found(model, FileNotFoundError(model))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    safe: bool | None = None if allow_pickle else True
    common: dict[str, Any] = {
        "revision": revision,
        "use_safetensors": safe,
        "local_files_only": hub_offline(),
    }
    unet = _load(UNet2DConditionModel, model, "unet", torch_dtype=torch_dtype, **common)
    vae = _load(AutoencoderKL, model, "vae", torch_dtype=torch.float32, **common)
    try:
        scheduler = DDIMScheduler.from_pretrained(
            model, subfolder="scheduler", revision=revision, local_files_only=hub_offline()
        )
    except (OSError, ValueError) as exc:
        raise _not_found(model, exc) from exc
    emb = empty_prompt_embedding(
        model, revision=revision, device=dev, dtype=torch_dtype, use_safetensors=safe
    )
    unet.to(dev).eval().requires_grad_(False)
    # The VAE runs in fp32 even on CUDA: SD VAEs overflow in fp16 (DiffCut does the same).
    vae.to(dev).eval().requires_grad_(False)
    return LoadedModel(
        name=model,
        unet=unet,
        vae=vae,
        alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64),
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        steps_offset=int(getattr(scheduler.config, "steps_offset", 0)),
        empty_embedding=emb,
        device=dev,
        dtype=torch_dtype,
    )
