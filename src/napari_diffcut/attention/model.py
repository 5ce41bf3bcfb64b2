"""Load a Stable Diffusion checkpoint: only the parts the method needs.

UNet, VAE and the scheduler config are kept; the text encoder(s) and
tokenizer(s) are loaded once to make the empty-prompt conditioning, which is
cached, and then dropped. SD 1.x/2.x folders have one text encoder; SDXL-class
folders (SDXL base, SDXL-Turbo, SSD-1B, Segmind Vega: UNets with
``addition_embed_type="text_time"``) have two, and their UNet also takes a
pooled text embedding and six "time ids" per call (:meth:`LoadedModel.unet_kwargs`).
``model`` is a Hugging Face repo id or a local folder in diffusers layout.
``HF_HUB_OFFLINE=1`` and the Hugging Face cache are honoured (diffusers and
huggingface_hub read them). Weights load from safetensors only, unless the
caller explicitly allows pickled ``.bin`` weights (they can run code on load).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from napari_diffcut.attention.devices import (  # noqa: F401 - re-exported
    cpu_has_native_bf16,
    resolve_device,
    resolve_dtype,
    vae_dtype_for,
)
from napari_diffcut.core.errors import DiffCutError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

#: Empty-prompt conditioning (token embeddings, pooled embedding or None), keyed by
#: (model, revision, dtype, device).
_EMBEDDING_CACHE: dict[
    tuple[str, str | None, str, str], tuple[torch.Tensor, torch.Tensor | None]
] = {}

#: UNet output kinds the DDIM inversion understands (diffusers scheduler ``prediction_type``).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

#: Text-encoder pairs of an SDXL-class folder, in the order their outputs are concatenated
#: (diffusers StableDiffusionXLPipeline.encode_prompt).
SDXL_TEXT_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def sdxl_time_ids(height: int, width: int) -> list[float]:
    """SDXL's six micro-conditioning ids for an image of ``height x width`` pixels.

    ``original_size + crops_coords_top_left + target_size`` with the working
    size as both sizes and no crop, as diffusers' StableDiffusionXLPipeline
    builds them by default (``_get_add_time_ids``; Podell et al. 2023, 2.2).
    """
    return [float(height), float(width), 0.0, 0.0, float(height), float(width)]


@dataclass
class LoadedModel:
    """The parts of a Stable Diffusion pipeline used by the method.

    ``pooled_embedding`` is set for SDXL-class UNets (``family == "sdxl"``),
    which also need the time ids of the working size: pass
    :meth:`unet_kwargs` to every UNet call.
    """

    name: str
    unet: Any
    vae: Any
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    steps_offset: int
    empty_embedding: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    pooled_embedding: torch.Tensor | None = None
    prediction_type: str = "epsilon"
    family: str = "sd"

    @property
    def vae_scale_factor(self) -> int:
        """Pixel size of one latent cell (8 for SD 1.x/2.x and SDXL)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def vae_dtype(self) -> torch.dtype:
        """dtype the VAE runs in (:func:`vae_dtype_for`)."""
        return next(self.vae.parameters()).dtype

    @property
    def native_latent(self) -> int:
        """Native latent side (UNet ``sample_size``: 64 for SD 1.5, 128 for SDXL)."""
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def native_size(self) -> int:
        """Native working size in pixels (512 for SD 1.5, 1024 for SDXL)."""
        return self.native_latent * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        """VAE latent scaling factor (0.18215 for SD 1.x, 0.13025 for SDXL)."""
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def attention_factors(self) -> tuple[int, ...]:
        """Downsampling factors (of the latent) at which the UNet has self-attention.

        SD 1.x/2.x: (1, 2, 4, 8); SDXL-class: (2, 4) (no attention at the latent grid).
        """
        cached = self.__dict__.get("_attention_factors")
        if cached is None:
            from napari_diffcut.attention.capture import attention_factors

            cached = self.__dict__["_attention_factors"] = attention_factors(self.unet)
        return cached

    @property
    def patch_factor(self) -> int:
        """Latent cells per side of one graph node: the finest attention factor.

        The engine segments on the finest grid the UNet has self-attention at:
        the latent grid for SD 1.x/2.x, half of it for SDXL (64 x 64 nodes at 1024 px).
        """
        return int(self.attention_factors[0])

    @property
    def patch_size(self) -> int:
        """Pixels per side of one graph node at the working size (SD 1.5: 8; SDXL: 16)."""
        return self.vae_scale_factor * self.patch_factor

    def unet_kwargs(self, latent_hw: tuple[int, int]) -> dict[str, Any]:
        """Conditioning keyword arguments of a UNet call on a latent of ``latent_hw``.

        The empty-prompt ``encoder_hidden_states``; for SDXL-class UNets also
        ``added_cond_kwargs`` with the pooled embedding and the time ids of the
        working size (:func:`sdxl_time_ids`).
        """
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.empty_embedding}
        if self.pooled_embedding is not None:
            f = self.vae_scale_factor
            ids = sdxl_time_ids(int(latent_hw[0]) * f, int(latent_hw[1]) * f)
            time_ids = torch.tensor([ids], dtype=self.dtype, device=self.device)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled_embedding,
                "time_ids": time_ids,
            }
        return kwargs


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
            "model: it needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/ "
            "(SDXL-class models also text_encoder_2/ and tokenizer_2/)"
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
        local = Path(model).expanduser()
        if local.is_dir() and not (local / subfolder).is_dir():
            missing = FileNotFoundError(f"the folder has no {subfolder}/")
            raise _not_found(model, missing) from exc
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
    sdxl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text-encoder conditioning for the empty prompt, cached per model.

    SD 1.x/2.x: the last hidden state of ``text_encoder`` (as diffusers'
    StableDiffusionPipeline without clip_skip), no pooled embedding. SDXL-class
    (``sdxl=True``): the penultimate hidden states of ``text_encoder`` and
    ``text_encoder_2`` concatenated on the feature axis, and the projected
    pooled output of ``text_encoder_2`` (diffusers
    StableDiffusionXLPipeline.encode_prompt). The empty prompt is encoded, not
    zeroed: the pipeline zeroes only the *negative* prompt
    (``force_zeros_for_empty_prompt``), and no guidance is used here.

    The encoders and tokenizers are loaded, used once and released.

    Returns
    -------
    embedding : Tensor (1, 77, D)
    pooled : Tensor (1, P) or None
    """
    key = (model, revision, str(dtype), str(device))
    if key in _EMBEDDING_CACHE:
        return _EMBEDDING_CACHE[key]
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pairs = SDXL_TEXT_ENCODERS if sdxl else (("tokenizer", "text_encoder"),)
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for tok_folder, enc_folder in pairs:
        cls = CLIPTextModelWithProjection if enc_folder == "text_encoder_2" else CLIPTextModel
        ids = _empty_prompt_ids(model, tok_folder, revision)
        encoder = _load(
            cls,
            model,
            enc_folder,
            revision=revision,
            use_safetensors=use_safetensors,
            local_files_only=hub_offline(),
        )
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=sdxl)
        if sdxl:
            hidden.append(out.hidden_states[-2])
            if enc_folder == "text_encoder_2":
                pooled = out[0]  # text_embeds: the projected pooled output
        else:
            hidden.append(out[0])
        del encoder
    emb = torch.cat(hidden, dim=-1).to(device=device, dtype=dtype)
    if pooled is not None:
        pooled = pooled.to(device=device, dtype=dtype)
    _EMBEDDING_CACHE[key] = (emb, pooled)
    return emb, pooled


def _empty_prompt_ids(model: str, subfolder: str, revision: str | None) -> torch.Tensor:
    """Token ids of the empty prompt, padded to the tokenizer's length."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model, subfolder=subfolder, revision=revision, local_files_only=hub_offline()
        )
    except (OSError, ValueError) as exc:
        raise _not_found(model, exc) from exc
    return tokenizer(
        [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _check_unet(model: str, unet: Any, vae: Any) -> str:
    """The model family ("sd" or "sdxl"); DiffCutError for UNets the method cannot drive."""
    cfg = unet.config
    latent = int(getattr(vae.config, "latent_channels", 4))
    if int(cfg.in_channels) != latent:
        raise DiffCutError(
            f"Model {model!r} has a UNet with {cfg.in_channels} input channels but a VAE "
            f"with {latent} latent channels (an inpainting or depth checkpoint?); use a "
            "text-to-image checkpoint"
        )
    kind = getattr(cfg, "addition_embed_type", None)
    if kind is None:
        return "sd"
    if kind == "text_time":
        return "sdxl"
    raise DiffCutError(
        f"Model {model!r} has a UNet with addition_embed_type={kind!r}, which "
        "napari-diffcut does not support (supported: SD 1.x/2.x and SDXL-class UNets; "
        "README 'Supported checkpoints')"
    )


def _check_sdxl_conditioning(model: str, unet: Any, pooled: torch.Tensor | None) -> None:
    """Time ids x ``addition_time_embed_dim`` + pooled size must fill ``add_embedding``.

    The same check as diffusers' StableDiffusionXLPipeline._get_add_time_ids.
    """
    expected = int(unet.add_embedding.linear_1.in_features)
    pooled_dim = 0 if pooled is None else int(pooled.shape[-1])
    passed = int(unet.config.addition_time_embed_dim) * len(sdxl_time_ids(1, 1)) + pooled_dim
    if passed != expected:
        raise DiffCutError(
            f"Model {model!r}: its UNet expects an added embedding of length {expected}, but "
            f"6 time ids x {unet.config.addition_time_embed_dim} + a pooled text embedding of "
            f"{pooled_dim} give {passed} (an SDXL refiner, or text encoders that do not "
            "match the UNet?)"
        )


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
        "auto" (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32),
        "float16", "bfloat16", "float32". The VAE follows
        :func:`vae_dtype_for` (fp32 where fp16 would overflow).
    revision : str, optional
        Git revision of a hub model.
    allow_pickle : bool
        Accept pickled ``.bin`` weights when a model has no safetensors.

    Raises
    ------
    DiffCutError
        Model not found (with where it was looked for and how to get it),
        no safetensors weights and ``allow_pickle`` is False, or a UNet kind
        that is not supported (inpainting, refiner, unCLIP).
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
    try:
        vae_config = AutoencoderKL.load_config(
            model, subfolder="vae", revision=revision, local_files_only=hub_offline()
        )
    except (OSError, ValueError) as exc:
        raise _not_found(model, exc) from exc
    # SD and SDXL VAEs overflow in fp16 (force_upcast in their configs; DiffCut too runs
    # the VAE in fp32); bf16 is safe and about 1.9x faster on CPUs with native bf16.
    vae_dtype = vae_dtype_for(torch_dtype, bool(vae_config.get("force_upcast", True)))
    vae = _load(AutoencoderKL, model, "vae", torch_dtype=vae_dtype, **common)
    family = _check_unet(model, unet, vae)
    try:
        scheduler = DDIMScheduler.from_pretrained(
            model, subfolder="scheduler", revision=revision, local_files_only=hub_offline()
        )
    except (OSError, ValueError) as exc:
        raise _not_found(model, exc) from exc
    prediction = str(getattr(scheduler.config, "prediction_type", "epsilon"))
    emb, pooled = empty_prompt_embedding(
        model,
        revision=revision,
        device=dev,
        dtype=torch_dtype,
        use_safetensors=safe,
        sdxl=family == "sdxl",
    )
    if family == "sdxl":
        _check_sdxl_conditioning(model, unet, pooled)
    if prediction not in PREDICTION_TYPES:
        raise DiffCutError(
            f"Model {model!r} has a scheduler with prediction_type={prediction!r}; "
            f"supported: {PREDICTION_TYPES}"
        )
    unet.to(dev).eval().requires_grad_(False)
    vae.to(dev).eval().requires_grad_(False)
    if dev.type == "cpu":
        # Same values with fewer fresh buffers and passes: VAE encode 3.6 s vs 4.1 s
        # at 512 px in bf16 on 2 cores (attention/inplace.py).
        from napari_diffcut.attention.inplace import use_inplace_resnets

        use_inplace_resnets(unet)
        use_inplace_resnets(vae)
    if dev.type == "cpu" and torch_dtype == torch.bfloat16:
        # oneDNN's bf16 convolutions are faster on channels-last tensors: VAE encode
        # 2.98 s vs 3.24 s, UNet 2.85 s vs 3.30 s at 512 px, SD 1.5 config, 2 cores
        # (benchmarks/bench_cpu_dtype.py); attention maps unchanged (ARI 1.0). In fp32
        # it was mixed (UNet slower), so fp32 keeps the default layout.
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    loaded = LoadedModel(
        name=model,
        unet=unet,
        vae=vae,
        alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64),
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        steps_offset=int(getattr(scheduler.config, "steps_offset", 0)),
        empty_embedding=emb,
        device=dev,
        dtype=torch_dtype,
        pooled_embedding=pooled,
        prediction_type=prediction,
        family=family,
    )
    if dev.type == "cpu":
        # Freed activations stay in the heap for the next run while this model lives
        # (about 1 s of page faults per 512 px run on 2 cores; attention/heap.py).
        from napari_diffcut.attention.heap import keep_freed_memory

        keep_freed_memory(loaded)
    return loaded
