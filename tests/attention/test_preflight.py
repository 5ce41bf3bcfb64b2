"""Model checks before torch: wrong folders, uncached models offline, bad spellings, at once."""

from __future__ import annotations

import doctest
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_diffcut.attention import preflight
from napari_diffcut.attention.preflight import (
    DTYPE_NAMES,
    check_device_name,
    check_dtype_name,
    check_model,
    probe_address,
)
from napari_diffcut.core.errors import DiffCutError

REPO = "owner/sd-model"


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No reachability result carried over between tests."""
    monkeypatch.setattr(preflight, "_PROBES", {})
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def _folder(
    root: Path, parts: tuple[str, ...] = preflight.REQUIRED_PARTS, weights: str = ".safetensors"
) -> Path:
    root.mkdir(parents=True)
    for part in parts:
        (root / part).mkdir()
        if part in preflight.WEIGHT_PARTS:
            (root / part / f"model{weights}").write_bytes(b"")
    return root


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of our own."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_model(cache: Path, repo: str, files: tuple[str, ...] = preflight.CACHE_PROBES) -> Path:
    """The cache layout huggingface_hub writes: refs/main -> snapshots/<commit>/FILES."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    for name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text("{}")
    return snapshot


def test_complete_folder_passes(tmp_path: Path) -> None:
    found = check_model(str(_folder(tmp_path / "sd15")))
    assert found.source == "folder" and found.location == str((tmp_path / "sd15").resolve())


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DiffCutError, match="Could not load model") as info:
        check_model(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(info.value) and "does not exist" in str(info.value)


def test_incomplete_folder_lists_what_is_missing(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "sd15", ("unet", "scheduler"))
    with pytest.raises(DiffCutError, match="not a complete diffusers model") as info:
        check_model(str(folder))
    assert "it has no vae/, text_encoder/, tokenizer/" in str(info.value)


def test_sdxl_folder_needs_its_second_text_encoder(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "xl")
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"})
    )
    with pytest.raises(DiffCutError, match="it has no text_encoder_2/, tokenizer_2/"):
        check_model(str(folder))


def test_pickled_weights_need_allow_pickle(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "old", weights=".bin")
    with pytest.raises(DiffCutError, match="no safetensors weights in unet, vae, text_encoder"):
        check_model(str(folder))
    assert check_model(str(folder), allow_pickle=True).source == "folder"


def test_a_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(DiffCutError, match="is a file"):
        check_model(str(path))


def test_bad_repo_id_form(hub_cache: Path) -> None:
    with pytest.raises(DiffCutError, match="repo id of the form owner/name"):
        check_model("own er/na me")


def test_cached_model_is_found_offline(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = _cache_model(hub_cache, REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = check_model(REPO)
    assert (found.source, found.location, found.offline) == ("cache", str(snapshot), True)


def test_partly_cached_model_is_not_enough(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cache_model(hub_cache, REPO, ("model_index.json",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffCutError, match="not in the Hugging Face cache"):
        check_model(REPO)


def test_uncached_offline_fails_at_once_with_how_to_get_it(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DiffCutError) as info:
        check_model(REPO)
    assert time.perf_counter() - start < 1.0
    text = str(info.value)
    assert "\n" not in text and "HF_HUB_OFFLINE is set" in text and str(hub_cache) in text
    assert f"download {REPO} --local-dir DIR" in text and "(--model DIR)" in text
    assert "(--backbone pixels)" in text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_uncached_without_network_fails_within_the_probe_timeout(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probe really runs: through a "proxy" on a closed local port, refused at once.
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    with pytest.raises(DiffCutError, match=r"huggingface\.co cannot be reached \(no network\)"):
        check_model(REPO)
    assert time.perf_counter() - start < preflight.NETWORK_TIMEOUT + 1.0


def test_uncached_with_network_goes_to_the_hub(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as server:  # a listening "proxy": the hub is reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
        found = check_model(REPO)
    assert found.source == "hub" and not found.offline


def test_cached_without_network_loads_offline(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cache_model(hub_cache, REPO)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
    assert check_model(REPO).offline


def test_probe_address_prefers_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert probe_address("https://huggingface.co") == ("huggingface.co", 443)
    assert probe_address("http://mirror.local:8080") == ("mirror.local", 8080)
    monkeypatch.setenv("https_proxy", "proxy.example:3128")
    assert probe_address("https://huggingface.co") == ("proxy.example", 3128)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_spellings(device: str) -> None:
    assert check_device_name(device) == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "CPU", "cuda:x", ""])
def test_bad_device_spellings(device: str) -> None:
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        check_device_name(device)


def test_dtype_names_are_the_loaders() -> None:
    torch = pytest.importorskip("torch")
    from napari_diffcut.attention.model import resolve_dtype

    for name in DTYPE_NAMES:
        assert check_dtype_name(name) == name
        resolve_dtype(name, torch.device("cpu"))  # the loader takes every name we pass
    for name in ("half", "float64", "int8"):
        with pytest.raises(ValueError):
            check_dtype_name(name)
        with pytest.raises(ValueError):
            resolve_dtype(name, torch.device("cpu"))


def test_engine_checks_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_diffcut.attention import model as model_module
    from napari_diffcut.pipeline.engine import ModelCache
    from napari_diffcut.pipeline.settings import Settings

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_model was reached")

    monkeypatch.setattr(model_module, "load_model", never)
    with pytest.raises(DiffCutError, match="does not exist"):
        ModelCache().model_for(Settings(model=str(tmp_path / "missing")))


def test_preflight_imports_no_torch() -> None:
    code = (
        "import sys; from napari_diffcut.attention.preflight import check_model\n"
        "try:\n    check_model('/no/such/model')\nexcept Exception:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_doctests() -> None:
    result = doctest.testmod(preflight, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 3
