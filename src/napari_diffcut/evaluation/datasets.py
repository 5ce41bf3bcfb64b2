"""Benchmark datasets on disk and the peers' crops and resolutions (numpy only).

Layouts (method.md 9.1), found under ``--root``:

- COCO-Stuff-27: COCO val2017 images and COCO-Stuff ``stuffthingmaps`` label
  PNGs (fine labels 0..181, 255 unlabelled), restricted to the curated 2,175
  images of ``Coco164kFull_Stuff_Coarse_7.txt`` and mapped fine -> 27 coarse
  classes (both shipped in ``cocostuff27.json``).
- Cityscapes: ``leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` with
  ``gtFine/SPLIT/CITY/*_gtFine_labelIds.png``; label ids 7..33 -> classes 0..26.
- folder: ``images/NAME.ext`` with ``masks/NAME.ext`` (or ``labels/``), PNG or TIFF.

A :class:`Protocol` holds the peers' preprocessing: a centre crop to a square,
a bilinear resize of the image to the model input size, nearest resizes of
the labels, and the size at which predictions are scored.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.evaluation.metrics import IGNORE
from napari_diffcut.files.io import IMAGE_SUFFIXES

DATASETS = ("coco-stuff-27", "cityscapes", "folder")
MASK_SUFFIXES = (".png", ".tif", ".tiff")

#: Cityscapes label ids 7..33 (27 classes), as in DiffSeg ``cityscapes_data.py``.
CITYSCAPES_NAMES = (
    "road",
    "sidewalk",
    "parking",
    "rail track",
    "building",
    "wall",
    "fence",
    "guard rail",
    "bridge",
    "tunnel",
    "pole",
    "polegroup",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "caravan",
    "trailer",
    "train",
    "motorcycle",
    "bicycle",
)
CITYSCAPES_FIRST_ID = 7

# Candidate folders, first found wins: ours (the COCO and COCO-Stuff zips unpacked
# under images/ and annotations/), STEGO/DiffCut (annotations/val2017), DiffSeg
# (val2017/ and annotation_val2017/ at the root).
COCO_IMAGE_DIRS = ("images/{split}2017", "{split}2017")
COCO_LABEL_DIRS = (
    "annotations/stuffthingmaps_trainval2017/{split}2017",
    "stuffthingmaps_trainval2017/{split}2017",
    "annotations/{split}2017",
    "annotation_{split}2017",
)


# ----------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Protocol:
    """Crop and resolutions of an evaluation.

    Attributes
    ----------
    name : str
        "diffseg", "diffcut" or "native".
    crop : {"diffseg", "diffcut", "none"}
        Centre crop to a square: DiffSeg keeps ``min(H, W)`` pixels with the
        offset rounded down; DiffCut (torchvision ``CenterCrop``) keeps
        ``min(H, W) - 1`` with the offset rounded half to even. "none": no crop.
    input_size : int or None
        Side of the square image given to the segmenter (bilinear, no
        antialiasing, like ``tf.image.resize`` and torchvision on tensors); None
        keeps the (cropped) image size.
    score_size : int or None
        Side at which predictions and labels are compared. None: input size.
    """

    name: str
    crop: str = "none"
    input_size: int | None = None
    score_size: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "name": self.name,
            "crop": self.crop,
            "input_size": self.input_size,
            "score_size": self.score_size,
        }


#: DiffSeg: 512 input, scored at 512. DiffCut: 1024 input, scored at 128 (method.md 9.1).
PROTOCOLS = {
    "diffseg": Protocol("diffseg", "diffseg", 512, 512),
    "diffcut": Protocol("diffcut", "diffcut", 1024, 128),
    "native": Protocol("native", "none", None, None),
}


def make_protocol(
    name: str, input_size: int | None = None, score_size: int | None = None
) -> Protocol:
    """A preset from :data:`PROTOCOLS`, optionally with other sizes.

    Without ``score_size`` the preset's rule stays: DiffSeg scores at its input
    size, DiffCut always at 128 (its masks are 128 x 128 whatever ``--img_size``).

    Examples
    --------
    >>> make_protocol("diffseg", input_size=256).score_size
    256
    >>> make_protocol("diffcut", input_size=512).score_size
    128
    """
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {name!r}")
    base = PROTOCOLS[name]
    for label, value in (("input_size", input_size), ("score_size", score_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 8
        ):
            raise ValueError(f"{label} must be an integer >= 8, got {value!r}")
    if input_size is None and score_size is None:
        return base
    if base.crop == "none" and (input_size or score_size):
        raise ValueError(
            "input_size/score_size need a square crop; use protocol 'diffseg' or 'diffcut' "
            f"(got protocol {name!r})"
        )
    new_input = input_size or base.input_size
    tied = base.score_size == base.input_size
    return Protocol(
        name, base.crop, new_input, score_size or (new_input if tied else base.score_size)
    )


def crop_box(shape: tuple[int, int], crop: str) -> tuple[int, int, int]:
    """(top, left, side) of the peers' centre crop for an image of ``shape``.

    Examples
    --------
    >>> crop_box((480, 640), "diffseg")
    (0, 80, 480)
    >>> crop_box((480, 640), "diffcut")
    (0, 80, 479)
    """
    h, w = int(shape[0]), int(shape[1])
    if crop == "diffseg":
        c = min(h, w)
        return (h - c) // 2, (w - c) // 2, c
    if crop == "diffcut":
        # torchvision CenterCrop: int(round((H - c) / 2)), Python rounds half to even.
        c = min(h, w) - 1
        return int(round((h - c) / 2.0)), int(round((w - c) / 2.0)), c
    raise ValueError(f"crop must be 'diffseg' or 'diffcut', got {crop!r}")


def resize_nearest(labels: NDArray[Any], size: int, mode: str = "exact") -> NDArray[Any]:
    """Nearest-neighbour resize of a square (or any) label map to ``size x size``.

    ``mode="exact"``: source index ``floor((i + 0.5) * in / out)`` (torchvision
    NEAREST_EXACT, ``tf.image.resize`` NEAREST_NEIGHBOR). ``mode="floor"``:
    ``floor(i * in / out)`` (``torch.nn.functional.interpolate`` "nearest",
    DiffCut's 1024 -> 128 step).
    """
    arr = np.asarray(labels)

    def index(n_in: int) -> NDArray[np.intp]:
        i = np.arange(size, dtype=np.float64)
        offset = 0.5 if mode == "exact" else 0.0
        return np.minimum(np.floor((i + offset) * (n_in / size)).astype(np.intp), n_in - 1)

    if mode not in ("exact", "floor"):
        raise ValueError(f"mode must be 'exact' or 'floor', got {mode!r}")
    return arr[index(arr.shape[0])][:, index(arr.shape[1])]


def resize_bilinear(image: NDArray[Any], size: int) -> NDArray[Any]:
    """Bilinear resize to ``size x size`` with half-pixel centres and no antialiasing.

    Integer images come back in their dtype (rounded, clipped), so a uint8
    image stays uint8 and the segmenter sees it as it would the original.
    """
    arr = np.asarray(image)
    src = arr.astype(np.float32)

    def taps(
        n_in: int,
    ) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float32]]:
        x = (np.arange(size, dtype=np.float64) + 0.5) * (n_in / size) - 0.5
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (x - lo).astype(np.float32)

    y0, y1, wy = taps(arr.shape[0])
    x0, x1, wx = taps(arr.shape[1])
    wy = wy.reshape((-1, 1) + (1,) * (arr.ndim - 2))
    wx = wx.reshape((1, -1) + (1,) * (arr.ndim - 2))
    rows = src[y0] * (1 - wy) + src[y1] * wy
    out = rows[:, x0] * (1 - wx) + rows[:, x1] * wx
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(arr.dtype)
    return out.astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32)


def prepare(
    image: NDArray[Any], truth: NDArray[Any], protocol: Protocol
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Image for the segmenter and labels at score size, as the peers prepare them.

    Labels are resized like DiffCut's: nearest-exact to the input size, then
    (when the score size differs) nearest-floor to the score size.
    """
    if np.shape(image)[:2] != np.shape(truth)[:2]:
        raise DiffCutError(
            f"image and mask sizes differ: {np.shape(image)[:2]} vs {np.shape(truth)[:2]}"
        )
    if protocol.crop == "none":
        return image, truth
    top, left, c = crop_box(np.shape(image)[:2], protocol.crop)
    image = np.asarray(image)[top : top + c, left : left + c]
    truth = np.asarray(truth)[top : top + c, left : left + c]
    size = protocol.input_size or c
    if size != c:
        image = resize_bilinear(image, size)
        truth = resize_nearest(truth, size, "exact")
    return image, score_labels(truth, protocol)


def score_labels(labels: NDArray[Any], protocol: Protocol) -> NDArray[Any]:
    """Labels (prediction or truth) at input size -> score size (nearest, floor)."""
    arr = np.asarray(labels)
    if protocol.score_size is None or arr.shape[0] == protocol.score_size == arr.shape[1]:
        return arr
    return resize_nearest(arr, protocol.score_size, "floor")


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Sample:
    """One image with its ground truth."""

    name: str
    image: Path
    mask: Path


@dataclass
class Dataset:
    """A list of samples plus how to read their labels.

    Attributes
    ----------
    name : str
        Dataset name ("coco-stuff-27", "cityscapes", "folder").
    root : Path
    samples : list of Sample
        In evaluation order (sorted; the COCO list order).
    n_class : int
        Ground-truth classes (2 for instance masks: background, foreground).
    class_names : list of str
    load_truth : callable
        Path -> label map: classes ``0..n_class-1``, ``IGNORE`` (255) unlabelled;
        for instance masks the instance map (0 = background).
    instances : bool
        Ground truth is instance labels.
    default_protocol : str
    info : dict
        JSON-serialisable description (layout found, list used, missing files).
    """

    name: str
    root: Path
    samples: list[Sample]
    n_class: int
    class_names: list[str]
    load_truth: Callable[[Path], NDArray[Any]]
    instances: bool = False
    default_protocol: str = "native"
    info: dict[str, Any] = field(default_factory=dict)


def read_labels(path: Path) -> NDArray[Any]:
    """A label image as a 2-D integer array (first channel of an RGB(A) PNG)."""
    from napari_diffcut.files.io import read_image

    arr = read_image(path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DiffCutError(f"{path}: expected a 2-D label image, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.array_equal(arr, np.round(arr)):
            raise DiffCutError(f"{path}: label image has non-integer values (dtype {arr.dtype})")
        arr = arr.astype(np.int64)
    return arr


@cache
def cocostuff27() -> dict[str, Any]:
    """The shipped COCO-Stuff-27 data: coarse names, fine->coarse map, val2017 ids."""
    with open(Path(__file__).with_name("cocostuff27.json"), encoding="utf-8") as fh:
        return json.load(fh)


def coarse_lut(fine_to_coarse: list[int]) -> NDArray[np.uint8]:
    """256-entry lookup table fine label -> coarse class, 255 elsewhere."""
    lut = np.full(256, IGNORE, np.uint8)
    lut[: len(fine_to_coarse)] = fine_to_coarse
    return lut


def _lut_loader(lut: NDArray[np.uint8]) -> Callable[[Path], NDArray[Any]]:
    def load(path: Path) -> NDArray[Any]:
        arr = read_labels(path)
        out = np.full(arr.shape, IGNORE, np.uint8)
        ok = (arr >= 0) & (arr < lut.size)
        out[ok] = lut[arr[ok]]
        return out

    return load


def _first_dir(root: Path, candidates: tuple[str, ...], split: str, what: str) -> Path:
    for pattern in candidates:
        d = root / pattern.format(split=split)
        if d.is_dir():
            return d
    tried = ", ".join(str(root / p.format(split=split)) for p in candidates)
    raise DiffCutError(f"no {what} folder under --root {root}; looked for: {tried}")


def read_id_list(path: Path) -> list[str]:
    """Image ids, one per line (blank lines ignored; a repeated id is refused)."""
    if not path.is_file():
        raise DiffCutError(f"image list not found: {path}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise DiffCutError(
            f"image list {path} names {len(repeated)} id(s) more than once (first: "
            f"{repeated[0]}); each image must be listed once to be scored once"
        )
    return ids


def coco_stuff_27(
    root: str | Path,
    *,
    split: str = "val",
    image_list: str | Path | None = None,
    allow_missing: bool = False,
    limit: int | None = None,
) -> Dataset:
    """COCO-Stuff-27: the curated 2,175 val2017 images, 27 coarse classes.

    Parameters
    ----------
    root : path
        Folder holding the images and stuffthingmaps (see ``COCO_IMAGE_DIRS``
        and ``COCO_LABEL_DIRS`` for the layouts found).
    image_list : path, optional
        Other image ids, one per line (default: the shipped curated list).
    allow_missing : bool
        Skip listed images that are not on disk (the result is then not
        comparable with the papers); by default a missing file is an error.
    limit : int, optional
        Only the first ``limit`` listed images (checked for presence).
    """
    root = Path(root)
    data = cocostuff27()
    if image_list is not None:
        ids = read_id_list(Path(image_list))
        source = str(image_list)
    else:
        ids = [f"{i:012d}" for i in data["val2017_ids"]]
        source = "shipped Coco164kFull_Stuff_Coarse_7.txt (2,175 ids)"
    if limit is not None:
        ids = ids[:limit]
    image_dir = _first_dir(root, COCO_IMAGE_DIRS, split, "COCO image")
    label_dir = _first_dir(root, COCO_LABEL_DIRS, split, "COCO-Stuff label (stuffthingmaps)")
    samples, missing = [], []
    for ident in ids:
        s = Sample(ident, image_dir / f"{ident}.jpg", label_dir / f"{ident}.png")
        if s.image.is_file() and s.mask.is_file():
            samples.append(s)
        else:
            missing.append(ident)
    if missing and not allow_missing:
        raise DiffCutError(
            f"{len(missing)} of {len(ids)} listed COCO-Stuff images are missing under "
            f"{image_dir} / {label_dir} (first: {missing[0]}); pass --allow-missing to skip "
            "them (the numbers are then not comparable with the papers')"
        )
    return Dataset(
        "coco-stuff-27",
        root,
        samples,
        27,
        list(data["coarse_names"]),
        _lut_loader(coarse_lut(data["fine_to_coarse"])),
        default_protocol="diffseg",
        info={
            "image_dir": str(image_dir),
            "label_dir": str(label_dir),
            "image_list": source,
            "listed": len(ids),
            "missing": missing,
        },
    )


def cityscapes(root: str | Path, *, split: str = "val", limit: int | None = None) -> Dataset:
    """Cityscapes with 27 classes (label ids 7..33; every other id ignored)."""
    root = Path(root)
    image_root = root / "leftImg8bit" / split
    if not image_root.is_dir():
        raise DiffCutError(f"no Cityscapes images: {image_root} is not a folder")
    samples = []
    for path in sorted(image_root.glob("*/*_leftImg8bit.png")):
        stem = path.name[: -len("_leftImg8bit.png")]
        mask = root / "gtFine" / split / path.parent.name / f"{stem}_gtFine_labelIds.png"
        if not mask.is_file():
            raise DiffCutError(f"Cityscapes label missing for {path.name}: {mask}")
        samples.append(Sample(f"{path.parent.name}/{stem}", path, mask))
    if not samples:
        raise DiffCutError(f"no *_leftImg8bit.png under {image_root}/CITY/")
    if limit is not None:
        samples = samples[:limit]
    lut = np.full(256, IGNORE, np.uint8)
    lut[CITYSCAPES_FIRST_ID : CITYSCAPES_FIRST_ID + 27] = np.arange(27)
    return Dataset(
        "cityscapes",
        root,
        samples,
        27,
        list(CITYSCAPES_NAMES),
        _lut_loader(lut),
        default_protocol="diffseg",
        info={"split": split},
    )


def _stem(path: Path) -> str:
    """``A01.png`` -> ``A01``, ``A01.ome.tif`` -> ``A01``, ``img.001.tif`` -> ``img.001``."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def _by_stem(paths: list[Path], suffixes: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """Files of ``suffixes`` by stem; two files with one stem are refused (ambiguous)."""
    found: dict[str, Path] = {}
    for p in sorted(paths):
        if p.suffix.lower() not in suffixes or p.name.startswith("."):
            continue
        stem = _stem(p)
        if stem in found:
            raise DiffCutError(
                f"{found[stem].name} and {p.name} in {folder} have the same name {stem!r}; "
                "keep one of them (each image is scored once, under its name)"
            )
        found[stem] = p
    return found


def _folder_pairs(root: Path, masks_dir: str | None) -> tuple[list[Sample], Path]:
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DiffCutError(f"folder dataset needs {image_dir}/ with the images")
    names = [masks_dir] if masks_dir else ["masks", "labels"]
    found = [root / n for n in names if (root / n).is_dir()]
    if not found:
        raise DiffCutError(
            f"folder dataset needs a masks folder: looked for {', '.join(names)} under {root}"
        )
    mask_dir = found[0]
    masks = _by_stem(list(mask_dir.iterdir()), MASK_SUFFIXES, mask_dir)
    images = _by_stem(list(image_dir.iterdir()), IMAGE_SUFFIXES, image_dir)
    samples = [Sample(stem, p, masks[stem]) for stem, p in images.items() if stem in masks]
    unmatched = [p.name for stem, p in images.items() if stem not in masks]
    if unmatched:
        raise DiffCutError(
            f"{len(unmatched)} image(s) in {image_dir} have no mask in {mask_dir} "
            f"(first: {unmatched[0]}); masks must share the image's name (png or tif)"
        )
    if not samples:
        raise DiffCutError(f"no image/mask pairs in {image_dir} and {mask_dir}")
    return samples, mask_dir


def folder(
    root: str | Path,
    *,
    instances: bool = False,
    masks_dir: str | None = None,
    n_class: int | None = None,
    ignore_index: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """Image/mask pairs ``ROOT/images/NAME.ext`` + ``ROOT/masks/NAME.ext``.

    Parameters
    ----------
    instances : bool
        Masks are instance labels (0 = background): scored as background /
        foreground classes, plus foreground IoU and object F1.
    masks_dir : str, optional
        Mask folder name under root (default: ``masks``, else ``labels``).
    n_class : int, optional
        Semantic classes are the mask values ``0..n_class-1`` (others unlabelled);
        default: every value present in the masks is a class (named by its value).
    ignore_index : int, optional
        Unlabelled value (semantic default 255, pass -1 for 0/255 binary masks;
        instance default: none).
    """
    root = Path(root)
    samples, mask_dir = _folder_pairs(root, masks_dir)
    info: dict[str, Any] = {
        "image_dir": str(root / "images"),
        "mask_dir": str(mask_dir),
    }
    if instances:

        def load_instances(path: Path) -> NDArray[Any]:
            arr = read_labels(path).astype(np.int64)
            if ignore_index is not None:
                arr[arr == ignore_index] = -1
            return arr

        return Dataset(
            "folder",
            root,
            samples[:limit],
            2,
            ["background", "foreground"],
            load_instances,
            instances=True,
            default_protocol="native",
            info=info,
        )
    ignore = IGNORE if ignore_index is None else ignore_index

    def read_semantic(path: Path) -> NDArray[Any]:
        arr = read_labels(path).astype(np.int64)
        arr[arr == ignore] = -1
        return arr

    if n_class is not None:
        info["classes_from"] = f"--n-classes {n_class}: mask values 0..{n_class - 1}"
        values = np.arange(n_class)
    else:
        # Every value present in any mask is a class (scanning all masks, not only the
        # first --limit, so that a resumed run sees the same classes).
        found = np.unique(np.concatenate([np.unique(read_semantic(s.mask)) for s in samples]))
        values = found[found >= 0]
        info["classes_from"] = "the values present in the masks"
    if values.size > 4096:
        raise DiffCutError(
            f"masks hold {values.size} different values: these look like instance masks; "
            "pass --instances (or --n-classes if they really are semantic classes)"
        )
    if values.size == 0:
        raise DiffCutError(f"masks in {mask_dir} hold no labelled pixel (all {ignore})")

    def load_semantic(path: Path) -> NDArray[Any]:
        arr = read_semantic(path)
        index = np.clip(np.searchsorted(values, arr), 0, values.size - 1)
        return np.where(values[index] == arr, index, -1)

    return Dataset(
        "folder",
        root,
        samples[:limit],
        int(values.size),
        [str(int(v)) for v in values],
        load_semantic,
        default_protocol="native",
        info=info,
    )


def semantic_truth(dataset: Dataset, truth: NDArray[Any]) -> NDArray[Any]:
    """Classes for the Hungarian scores: instance maps become 0 background / 1 foreground."""
    if not dataset.instances:
        return truth
    out = (np.asarray(truth) > 0).astype(np.int64)
    out[np.asarray(truth) < 0] = -1
    return out


def protocol_summary(p: Protocol) -> str:
    """One line for the printed table."""
    if p.crop == "none":
        return f"{p.name} (no crop, native size)"
    return (
        f"{p.name} (centre crop, input {p.input_size or 'crop'} px, "
        f"scored at {p.score_size or p.input_size or 'crop'} px)"
    )
