"""Checks of a model before torch is imported, so that a user mistake answers in under 2 s.

Importing torch and diffusers takes tens of seconds on a small machine, and
a hub model that is neither cached nor reachable costs huggingface_hub's
retries on top. Everything a user can get wrong about ``model``
(``--model``), and about ``device`` and ``dtype`` spellings, is checked here
with the standard library and huggingface_hub only:

* a local folder must exist and have the diffusers layout (``unet/``,
  ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``; SDXL-class
  folders also ``text_encoder_2/`` and ``tokenizer_2/``), with safetensors
  weights unless pickled weights are allowed;
* a hub repo id must have the ``owner/name`` form;
* a hub model is found in the Hugging Face cache, or the hub must be
  reachable (one TCP connection, ``NETWORK_TIMEOUT`` seconds at most), or the
  check fails at once with one line saying how to get the model.

:func:`check_model` is called by the command line before anything heavy and
by the engine before it loads a model
(:meth:`napari_diffcut.pipeline.engine.ModelCache.model_for`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from napari_diffcut.core.errors import DiffCutError

#: Sub-folders every diffusers folder the engine loads must have.
REQUIRED_PARTS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
#: Extra sub-folders of SDXL-class folders (two text encoders).
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
#: Sub-folders holding weights (what ``allow_pickle`` is about).
WEIGHT_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
#: Files whose presence in the Hugging Face cache means a download completed far
#: enough to load (a cache holding only model_index.json is a broken download).
CACHE_PROBES = ("model_index.json", "unet/config.json", "vae/config.json")
#: dtype names :func:`napari_diffcut.attention.model.resolve_dtype` accepts
#: (tests/attention/test_preflight.py keeps the two lists equal).
DTYPE_NAMES = ("auto", "float16", "fp16", "bfloat16", "bf16", "float32", "fp32")
#: Seconds the reachability probe of the hub may take: the whole check has to
#: stay under the 2 s a user mistake may cost.
NETWORK_TIMEOUT = 1.0
#: Seconds a probe result is reused (a batch or widget checks before each load).
PROBE_TTL = 30.0

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_PROBES: dict[tuple[str, int], tuple[float, bool]] = {}


@dataclass(frozen=True)
class ModelCheck:
    """Where a model will be loaded from.

    Attributes
    ----------
    model : str
        The model as given.
    source : {"folder", "cache", "hub"}
        A local folder; the Hugging Face cache; a download from the hub.
    location : str
        The folder, the cached snapshot folder, or the hub endpoint.
    offline : bool
        The hub cannot be reached (or ``HF_HUB_OFFLINE`` is set): the load has
        to use local files only.
    """

    model: str
    source: str
    location: str
    offline: bool = False


def looks_like_path(model: str) -> bool:
    """A folder path rather than a hub repo id ("owner/name").

    The same rule as the model loader's (:mod:`napari_diffcut.attention.model`).

    Examples
    --------
    >>> looks_like_path("./sd15"), looks_like_path("sd15"), looks_like_path("owner/name")
    (True, True, False)
    """
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") != 1


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (read at call time, as the loader does)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_device_name(device: str) -> str:
    """``device`` if it is spelled as the loader accepts it, else ``ValueError``.

    Whether CUDA or MPS is *available* needs torch and is checked when the
    model loads; a misspelling is caught here, before torch is imported.

    Examples
    --------
    >>> check_device_name("cuda:1")
    'cuda:1'
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
        )
    return device


def check_dtype_name(dtype: str) -> str:
    """``dtype`` if the loader knows the name, else ``ValueError``."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {dtype!r}")
    return dtype


def download_hint(model: str) -> str:
    """The command that downloads ``model`` into a folder, for the installed hub client."""
    tool = "hf" if shutil.which("hf") else "huggingface-cli"
    return f"`{tool} download {model} --local-dir DIR`"


def check_model(
    model: str,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    timeout: float = NETWORK_TIMEOUT,
) -> ModelCheck:
    """Check that ``model`` can be loaded, without importing torch.

    Parameters
    ----------
    model : str
        Local diffusers folder or Hugging Face repo id.
    revision : str, optional
        Revision of a hub model (the cache is looked up for it).
    allow_pickle : bool
        Accept a folder whose weights are pickled ``.bin`` files only.
    timeout : float
        Seconds the hub reachability probe may take.

    Returns
    -------
    ModelCheck
        Where the model will come from.

    Raises
    ------
    DiffCutError
        One line: which model, where it was looked for, how to get it.

    Examples
    --------
    >>> check_model("/no/such/sd15")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    napari_diffcut.core.errors.DiffCutError: Could not load model '/no/such/sd15': ...
    """
    if not isinstance(model, str | os.PathLike) or not str(model):
        raise ValueError(f"model must be a repo id or a folder path, got {model!r}")
    model = str(model)
    folder = Path(model).expanduser()
    if folder.exists() or looks_like_path(model):
        return check_folder(model, allow_pickle=allow_pickle)
    return check_hub_model(model, revision=revision, timeout=timeout)


def check_folder(model: str, *, allow_pickle: bool = False) -> ModelCheck:
    """Check a local model folder: it exists, has the diffusers layout and usable weights."""
    folder = Path(model).expanduser()
    where = folder.resolve()
    if not folder.exists():
        raise DiffCutError(
            f"Could not load model {model!r}: the local folder {where} does not exist. "
            "Check the path, or pass a Hugging Face repo id (owner/name) such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    if not folder.is_dir():
        raise DiffCutError(
            f"Could not load model {model!r}: {where} is a file; model (--model) is a "
            "diffusers folder (unet/, vae/, ...) or a Hugging Face repo id"
        )
    wanted = REQUIRED_PARTS + (SDXL_PARTS if is_sdxl_folder(folder) else ())
    missing = [part for part in wanted if not (folder / part).is_dir()]
    if missing:
        raise DiffCutError(
            f"Could not load model {model!r}: the local folder {where} is not a complete "
            f"diffusers model: it has no {', '.join(p + '/' for p in missing)} (it needs "
            f"{', '.join(p + '/' for p in REQUIRED_PARTS)}; SDXL-class models also "
            f"{', '.join(p + '/' for p in SDXL_PARTS)}). Point model (--model) at a complete "
            f"diffusers folder, e.g. one made by {download_hint('OWNER/NAME')}."
        )
    if not allow_pickle:
        pickled = [p for p in WEIGHT_PARTS if (folder / p).is_dir() and _pickled_only(folder / p)]
        if pickled:
            raise DiffCutError(
                f"Model {model!r} has no safetensors weights in {', '.join(pickled)}, only "
                "pickled .bin files, which can run arbitrary code when loaded. Convert it to "
                "safetensors, or pass allow_pickle=True (--allow-pickle) if you trust its source."
            )
    return ModelCheck(model, "folder", str(where))


def is_sdxl_folder(folder: Path) -> bool:
    """Whether a diffusers folder is SDXL-class (two text encoders)."""
    import json

    if (folder / "text_encoder_2").is_dir():
        return True
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict):
        return False
    return "text_encoder_2" in index or "XL" in str(index.get("_class_name", ""))


def _pickled_only(part: Path) -> bool:
    """A weights folder with .bin weights and no safetensors (any shard naming)."""
    names = [p.name for p in part.iterdir()]
    has_safe = any(n.endswith(".safetensors") for n in names)
    return not has_safe and any(n.endswith(".bin") for n in names)


def check_hub_model(
    model: str, *, revision: str | None = None, timeout: float = NETWORK_TIMEOUT
) -> ModelCheck:
    """Check a hub repo id: its form, then the Hugging Face cache, then the network."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise DiffCutError(
            f"Could not load model {model!r}: it is neither an existing local folder nor a "
            "Hugging Face repo id of the form owner/name (letters, digits, '-', '_', '.')"
        ) from None
    snapshot = cached_snapshot(model, revision)
    offline = hub_offline() or not hub_reachable(constants.ENDPOINT, timeout)
    if snapshot is not None:
        return ModelCheck(model, "cache", str(snapshot), offline=offline)
    if not offline:
        return ModelCheck(model, "hub", constants.ENDPOINT)
    why = (
        "HF_HUB_OFFLINE is set"
        if hub_offline()
        else f"{urlsplit(constants.ENDPOINT).hostname} cannot be reached (no network)"
    )
    raise DiffCutError(
        f"Could not load model {model!r}: it is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {why}, so it cannot be downloaded. Download it "
        f"where there is internet with {download_hint(model)}, copy DIR here and pass "
        "model=DIR (--model DIR); or run without a model: backbone='pixels' (--backbone pixels)."
    )


def cached_snapshot(model: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of a hub model, or None when it is not (fully) cached.

    Looks up a few files of the snapshot with huggingface_hub's cache lookup
    (no network, no scan of the whole cache).
    """
    from huggingface_hub import try_to_load_from_cache

    found: list[Path] = []
    for name in CACHE_PROBES:
        path = try_to_load_from_cache(model, name, revision=revision)
        if not isinstance(path, str):  # None (not cached) or the "known missing" marker
            return None
        found.append(Path(path))
    # model_index.json sits at the snapshot root.
    return found[0].parent


def hub_reachable(endpoint: str, timeout: float = NETWORK_TIMEOUT) -> bool:
    """Whether a TCP connection to the hub (or to the HTTPS proxy) opens within ``timeout``.

    Name resolution has no timeout of its own, so the probe runs in a daemon
    thread that is abandoned when it takes too long. Results are reused for
    :data:`PROBE_TTL` seconds.
    """
    host, port = probe_address(endpoint)
    now = time.monotonic()
    cached = _PROBES.get((host, port))
    if cached is not None and now - cached[0] < PROBE_TTL:
        return cached[1]
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="napari-diffcut-hub-probe")
    thread.start()
    thread.join(timeout)
    ok = bool(result and result[0])
    _PROBES[(host, port)] = (now, ok)
    return ok


def probe_address(endpoint: str) -> tuple[str, int]:
    """(host, port) to probe for ``endpoint``: the HTTPS proxy when one is set.

    Examples
    --------
    >>> probe_address("https://huggingface.co") if not os.environ.get("HTTPS_PROXY") else None
    ('huggingface.co', 443)
    """
    proxy = next(
        (os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
         if os.environ.get(k)),
        None,
    )
    url = urlsplit(proxy if proxy else endpoint)
    if not url.hostname:  # a proxy given as host:port without a scheme
        url = urlsplit("http://" + (proxy or endpoint))
    default = 443 if url.scheme == "https" else 80
    return url.hostname or "huggingface.co", url.port or default


@contextlib.contextmanager
def hub_offline_if(offline: bool) -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` while the model loads, when the hub cannot be reached.

    The model is in the cache (the preflight found it) but the hub is not
    reachable: the loader then reads the cache only (it reads this variable)
    instead of letting huggingface_hub retry the network. Restored afterwards.
    """
    before = os.environ.get("HF_HUB_OFFLINE")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if offline:
            if before is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = before
