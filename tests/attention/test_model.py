"""Model loading: local folders, missing models, safetensors-only, devices and dtypes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from napari_diffcut.attention import model as model_mod  # noqa: E402
from napari_diffcut.attention.model import (  # noqa: E402
    load_model,
    resolve_device,
    resolve_dtype,
)
from napari_diffcut.core.errors import DiffCutError  # noqa: E402


def test_loads_local_folder(tiny_model: Path) -> None:
    m = load_model(str(tiny_model), device="auto", dtype="float32")
    assert m.device.type == "cpu" and m.dtype == torch.float32
    assert m.vae_scale_factor == 8 and m.native_latent == 32 and m.native_size == 256
    assert m.empty_embedding.shape[:2] == (1, 77)
    assert not hasattr(m, "text_encoder")  # the encoder is not kept
    assert m.alphas_cumprod.shape == (1000,)


def test_empty_embedding_is_cached(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_model(str(tiny_model), device="cpu")
    import transformers

    def fail(*args, **kwargs):
        raise AssertionError("text encoder loaded again")

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", fail)
    load_model(str(tiny_model), device="cpu")


def test_missing_local_folder_message(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(DiffCutError) as info:
        load_model(str(missing), device="cpu")
    text = str(info.value)
    assert str(missing) in text and "does not exist" in text


def test_missing_repo_id_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffCutError) as info:
        load_model("nobody/not-a-model", device="cpu")
    text = str(info.value)
    assert "Hugging Face cache" in text and "--model" in text and "HF_HUB_OFFLINE" in text


def test_missing_hub_model_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffCutError, match="Could not load model 'nobody/not-a-model'"):
        load_model("nobody/not-a-model", device="cpu")


def test_incomplete_folder(tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(DiffCutError, match="not a complete diffusers model"):
        load_model(str(broken), device="cpu")


def test_pickled_weights_refused_unless_allowed(tiny_model: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    shutil.rmtree(pickled / "unet")
    unet.save_pretrained(pickled / "unet", safe_serialization=False)
    assert not list((pickled / "unet").glob("*.safetensors"))
    with pytest.raises(DiffCutError, match="no safetensors weights"):
        load_model(str(pickled), device="cpu")
    m = load_model(str(pickled), device="cpu", allow_pickle=True)
    assert m.unet is not None


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(DiffCutError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("gpu0")
    expected_cpu = torch.bfloat16 if model_mod.cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected_cpu
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8", torch.device("cpu"))


def test_default_model_name() -> None:
    assert model_mod.DEFAULT_MODEL == "stable-diffusion-v1-5/stable-diffusion-v1-5"


# --- SDXL-class folders, dtypes, unsupported UNets (issue 14) ---------------------------


def _sdxl_pipeline(folder: Path):
    """diffusers' own SDXL pipeline on the folder's parts: the reference for the conditioning."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers import EulerDiscreteScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2"
        ),
        tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        tokenizer_2=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        scheduler=EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
    )


@pytest.mark.parametrize("fixture", ["tiny_sdxl_model", "tiny_ssd1b_model"])
def test_sdxl_conditioning_equals_diffusers_pipeline(
    fixture: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = request.getfixturevalue(fixture)
    m = load_model(str(folder), device="cpu", dtype="float32")  # vs the fp32 pipeline
    assert m.family == "sdxl" and m.attention_factors == (2, 4) and m.patch_size == 16
    assert m.scaling_factor == 0.13025 and m.vae_dtype == torch.float32
    pipe = _sdxl_pipeline(folder)
    emb, _, pooled, _ = pipe.encode_prompt(
        "", device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    torch.testing.assert_close(m.empty_embedding, emb)
    torch.testing.assert_close(m.pooled_embedding, pooled)
    kwargs = m.unet_kwargs((24, 40))  # a 192 x 320 px working size
    time_ids = pipe._get_add_time_ids(
        (192, 320), (0, 0), (192, 320), torch.float32, text_encoder_projection_dim=32
    )
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"], time_ids)
    assert kwargs["encoder_hidden_states"] is m.empty_embedding


def test_sd_family_has_no_added_conditioning(tiny_model: Path) -> None:
    m = load_model(str(tiny_model), device="cpu")
    assert m.family == "sd" and m.pooled_embedding is None
    assert set(m.unet_kwargs((32, 32))) == {"encoder_hidden_states"}
    assert m.attention_factors == (1, 2, 4) and m.patch_size == 8


def test_euler_scheduler_folder_gives_the_same_schedule(
    tiny_model: Path, tiny_sdxl_model: Path
) -> None:
    a = load_model(str(tiny_model), device="cpu")
    b = load_model(str(tiny_sdxl_model), device="cpu")
    torch.testing.assert_close(a.alphas_cumprod, b.alphas_cumprod)
    assert (b.num_train_timesteps, b.steps_offset) == (1000, 1)


def test_dtype_auto_uses_bf16_only_with_native_support(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_diffcut.attention import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("float32", cpu) == torch.float32
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16


def test_vae_dtype_rule() -> None:
    from napari_diffcut.attention.devices import vae_dtype_for

    assert vae_dtype_for(torch.float16, force_upcast=True) == torch.float32  # SD/SDXL VAEs
    assert vae_dtype_for(torch.float16, force_upcast=False) == torch.float16  # fp16-fix VAE
    assert vae_dtype_for(torch.bfloat16, force_upcast=True) == torch.bfloat16
    assert vae_dtype_for(torch.float32, force_upcast=False) == torch.float32


def test_vae_dtype_follows_the_folder(tiny_sdxl_model: Path, tmp_path: Path) -> None:
    m = load_model(str(tiny_sdxl_model), device="cpu", dtype="float16")
    assert m.dtype == torch.float16 and m.vae_dtype == torch.float32
    fixed = tmp_path / "fp16-fix"
    shutil.copytree(tiny_sdxl_model, fixed)
    cfg_path = fixed / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["force_upcast"] = False
    cfg_path.write_text(json.dumps(cfg))
    assert load_model(str(fixed), device="cpu", dtype="float16").vae_dtype == torch.float16
    bf = load_model(str(tiny_sdxl_model), device="cpu", dtype="bfloat16")
    assert bf.vae_dtype == torch.bfloat16 and bf.pooled_embedding.dtype == torch.bfloat16


def _copy_with_unet(src: Path, dst: Path, **changes) -> Path:
    from diffusers import UNet2DConditionModel

    shutil.copytree(src, dst)
    cfg = dict(UNet2DConditionModel.load_config(src, subfolder="unet"))
    cfg.update(changes)
    shutil.rmtree(dst / "unet")
    UNet2DConditionModel.from_config(cfg).save_pretrained(dst / "unet")
    return dst


def test_inpainting_unet_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = _copy_with_unet(tiny_model, tmp_path / "inpaint", in_channels=9)
    with pytest.raises(DiffCutError, match="9 input channels"):
        load_model(str(folder), device="cpu")


def test_sdxl_conditioning_size_mismatch_is_refused(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    folder = _copy_with_unet(
        tiny_sdxl_model, tmp_path / "refiner-like", projection_class_embeddings_input_dim=72
    )
    with pytest.raises(DiffCutError, match="added embedding of length 72"):
        load_model(str(folder), device="cpu")


def test_unknown_prediction_type_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "flow"
    shutil.copytree(tiny_model, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "flow"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DiffCutError, match="prediction_type='flow'"):
        load_model(str(folder), device="cpu")


def test_sdxl_folder_missing_second_encoder(tiny_sdxl_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-te2"
    shutil.copytree(tiny_sdxl_model, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(DiffCutError, match="text_encoder_2"):
        load_model(str(folder), device="cpu")
