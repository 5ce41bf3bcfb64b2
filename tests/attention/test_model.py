"""Model loading: local folders, missing models, safetensors-only, devices and dtypes."""

from __future__ import annotations

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
    m = load_model(str(tiny_model), device="auto")
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
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8", torch.device("cpu"))


def test_default_model_name() -> None:
    assert model_mod.DEFAULT_MODEL == "stable-diffusion-v1-5/stable-diffusion-v1-5"
