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


