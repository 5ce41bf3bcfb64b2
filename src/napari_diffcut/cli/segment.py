"""``napari-diffcut segment IMAGE [IMAGE ...] --out DIR``: the command's inputs and outputs.

The contract (README "Command line"):

* several images, or shipped samples (``--sample blood-smear``), in one run;
* ``--out DIR`` is a folder, created if missing, that receives one
  ``NAME.diffcut.tif`` and one ``NAME.diffcut.json`` per image (and
  ``NAME.levels.tif`` with ``--levels``, ``NAME.instances.tif`` and
  ``NAME.instances.csv`` with ``--instances``); without ``--out`` they go beside
  each input; ``-o FILE.tif`` (or ``FILE.zarr``) names the labels of a single image;
* every output name is planned and checked before anything is computed
  (never an input, never an existing file without ``--overwrite``, never two
  images onto one name), and each image's outputs land together
  (:mod:`napari_diffcut.files.outputs`);
* one line per image on stdout when it is done.

Where outputs go is decided by :func:`output_paths` alone and they are
written by :func:`write_outputs` alone.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_diffcut.pipeline.options import UserError, at_least

#: Suffixes of a label *file* given to ``--out`` (anything else names a folder).
LABEL_SUFFIXES = (".tif", ".tiff", ".zarr")
#: Suffixes that name a file we cannot write labels as: refused rather than made
#: into a folder called ``out.png``.
NOT_LABEL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".json", ".npy")


@dataclass(frozen=True)
class ImageInput:
    """One image of a run: a file, or a shipped sample.

    Attributes
    ----------
    name : str
        Output stem and the name shown in the per-image line.
    path : Path or None
        The image file; None for a sample.
    sample : str or None
        Sample name (a key of :data:`napari_diffcut.files.samples.SAMPLES`).
    """

    name: str
    path: Path | None = None
    sample: str | None = None

    @property
    def label(self) -> str:
        """How the image is named in messages."""
        return str(self.path) if self.path is not None else f"sample {self.sample}"


def image_stem(path: Path) -> str:
    """Output stem of an input file: its name without the image suffix.

    Examples
    --------
    >>> image_stem(Path("a/cells.ome.tif")), image_stem(Path("img.v2.png"))
    ('cells', 'img.v2')
    """
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name[: -len(path.suffix)] if path.suffix else name


def collect_inputs(images: list[str], samples: list[str]) -> list[ImageInput]:
    """The run's images, files first, each checked to exist (no image is read)."""
    if not images and not samples:
        raise UserError("no image given: pass IMAGE [IMAGE ...] or --sample NAME")
    found = []
    for text in images:
        path = Path(text)
        if not path.exists():
            raise UserError(f"image file not found: {path}")
        found.append(ImageInput(image_stem(path), path=path))
    found.extend(ImageInput(name, sample=name) for name in samples)
    return found


def out_mode(out: str | None, n_images: int) -> tuple[str, Path | None]:
    """How ``--out`` is read: ("beside", None), ("folder", DIR) or ("file", FILE).

    A name ending in ``.tif``/``.tiff``/``.zarr`` names the labels of one
    image (a ``.zarr`` label store is a folder too); any other name is a
    folder, created if missing.
    """
    if out is None:
        return "beside", None
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix in LABEL_SUFFIXES and not out.endswith(("/", "\\")):
        if n_images != 1:
            raise UserError(
                f"--out {out} names one label file but {n_images} images were given; "
                "pass a folder (--out DIR) for several images"
            )
        return "file", path
    if suffix in NOT_LABEL_SUFFIXES and not path.is_dir():
        raise UserError(
            f"--out {out}: labels are written as .tif or .zarr; pass a folder (--out DIR, "
            "created if missing) or a label file (-o FILE.tif)"
        )
    return "folder", path


def output_paths(
    image: ImageInput, mode: str, out: Path | None
) -> tuple[Path, Path, Path]:
    """(labels, levels TIFF, record JSON) of one image.

    ``NAME.diffcut.tif``, ``NAME.levels.tif`` and ``NAME.diffcut.json`` in the
    ``--out`` folder, or beside the input (a sample: the current folder); with
    ``-o FILE.tif`` the names of :func:`napari_diffcut.files.outputs.output_names`.
    """
    from napari_diffcut.files.outputs import output_names

    if mode == "file" and out is not None:
        return output_names(out)
    if mode == "folder" and out is not None:
        folder = out
    elif image.path is not None:
        folder = image.path.parent
    else:
        folder = Path(".")
    return output_names(folder / f"{image.name}.diffcut.tif")


def plan_all(
    images: list[ImageInput],
    mode: str,
    out: Path | None,
    *,
    levels: bool,
    overwrite: bool,
    instances: bool = False,
) -> list[Any]:
    """Checked output plans of every image, before any image is read or segmented.

    Each plan is checked by :func:`napari_diffcut.files.outputs.plan_outputs`
    (never an input, never a file without ``--overwrite``); here also no two
    images may share a name, and every output folder must be writable.
    """
    from napari_diffcut.files.outputs import instance_names, plan_outputs

    inputs = [i.path for i in images if i.path is not None]
    plans = []
    claimed: dict[Path, ImageInput] = {}
    for image in images:
        names = output_paths(image, mode, out)
        written = [names[0], *([names[1]] if levels else []), names[2]]
        written += list(instance_names(names[0])) if instances else []
        for path in written:
            key = path.absolute()
            if key in claimed:
                raise UserError(
                    f"{claimed[key].label} and {image.label} would both write {path}; "
                    "rename one or segment them into different --out folders"
                )
            claimed[key] = image
        plans.append(
            plan_outputs(
                names[0], inputs=inputs, levels=levels, overwrite=overwrite, names=names,
                instances=instances,
            )
        )
    for folder in sorted({plan.folder for plan in plans}):
        check_writable(folder)
    return plans


def check_writable(folder: Path) -> None:
    """``folder`` is, or can be created as, a writable folder (nothing is created yet)."""
    import os

    from napari_diffcut.core.errors import DiffCutError

    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DiffCutError(f"cannot write outputs in {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DiffCutError(f"cannot write outputs in {folder}: {probe} is not writable")


def read_input(image: ImageInput, memory_budget: int) -> tuple[Any, str]:
    """The image array (lazy for large files) and its TIFF axes string ('' if unknown)."""
    if image.sample is not None:
        from napari_diffcut.files.samples import sample_image

        return sample_image(image.sample), ""
    from napari_diffcut.large.sources import open_image

    assert image.path is not None
    data, axes = open_image(image.path, memory_budget=memory_budget)
    return data, axes or ""


def input_record(image: ImageInput, axes: str) -> dict[str, Any]:
    """What the record says about the input (a file path, or which sample)."""
    if image.sample is not None:
        # Samples are made in code: this call regenerates the very image.
        call = f"napari_diffcut.files.samples.sample_image({image.sample!r})"
        return {"input": None, "sample": image.sample, "sample_image": call}
    rec: dict[str, Any] = {"input": str(image.path)}
    if axes:
        rec["input_axes"] = axes
    return rec


def write_outputs(
    run: Any, seg: Any, record: dict[str, Any], *, levels: bool, instances: Any = None
) -> list[Path]:
    """Write one image's labels (+ levels, + instances) and record, then commit.

    ``instances`` is the :class:`~napari_diffcut.core.instances.Instances` of
    the labels when ``--instances`` was given.
    """
    import numpy as np

    from napari_diffcut.cli.labels import write_label_output
    from napari_diffcut.results.export import instance_table_csv

    stack = np.stack([np.asarray(v) for v in seg.levels]) if levels else None
    counted = None
    if instances is not None:
        record["instances"] = instances.record()
        counted = (instances.labels, instance_table_csv(instances.table))
    run.write(seg.labels, stack, record, write=write_label_output, instances=counted)
    return run.commit()


def segment_images(args: argparse.Namespace) -> int:
    """Run ``segment``: check everything first, then one image after the other."""
    from napari_diffcut.attention.preflight import check_model, hub_offline_if

    images = collect_inputs(args.image, args.sample or [])
    mode, out = out_mode(args.out, len(images))
    plans = plan_all(
        images, mode, out, levels=args.levels, overwrite=args.overwrite,
        instances=args.instances,
    )
    offline = False
    if args.backbone == "diffusion":
        found = check_model(args.model, revision=args.revision, allow_pickle=args.allow_pickle)
        offline = found.offline
    from napari_diffcut.large.dispatch import DiffCutEngine
    from napari_diffcut.pipeline.options import settings_from_args

    settings = settings_from_args(args)
    engine = DiffCutEngine()
    with hub_offline_if(offline):  # the preflight found it cached, the hub unreachable
        if settings.backbone == "diffusion":
            engine.model_for(settings)  # once, before the first image: a failure stops here
    for index, (image, plan) in enumerate(zip(images, plans, strict=True), start=1):
        line = segment_one(image, plan, settings, engine, args)
        print(f"[{index}/{len(images)}] {line}", flush=True)
    return 0


def segment_one(image: ImageInput, plan: Any, settings: Any, engine: Any, args: Any) -> str:
    """Segment one image and write its outputs; the line that reports it."""
    import dataclasses

    from napari_diffcut.cli.labels import (
        channel_axis_from_axes,
        check_instances_possible,
        check_levels_possible,
        count_output_instances,
        output_bytes,
        summary,
    )
    from napari_diffcut.files.outputs import OutputRun
    from napari_diffcut.pipeline.engine import drain
    from napari_diffcut.pipeline.options import clear_progress, print_progress

    data, axes = read_input(image, settings.memory_budget)
    s = channel_axis_from_axes(settings, axes) if settings.channel_axis is None else settings
    if args.levels:
        check_levels_possible(data, s)
    if args.instances:
        check_instances_possible(data, s)
    need = output_bytes(data, levels=args.levels, max_depth=s.max_depth)
    need += output_bytes(data, levels=False, max_depth=0) if args.instances else 0
    plan = dataclasses.replace(plan, need_bytes=need)
    with OutputRun(plan, own_temp=True) as run:  # writable, with room, before computing
        to_zarr = plan.labels.suffix.lower() == ".zarr"
        target = str(run.staged(plan.labels)) if to_zarr else None
        try:
            seg = drain(engine.iter_segment(data, s, out=target), print_progress(args.quiet))
        finally:
            clear_progress()
        record = dict(seg.settings, **input_record(image, axes))
        record["threshold_used"] = getattr(seg, "threshold", None)
        if "labels_store" in record:  # the final name, not the staging or temporary one
            record["labels_store"] = str(plan.labels) if to_zarr else None
        used = record.get("channel_axis_used")
        if axes:
            record["labels_axes"] = axes if used is None else axes[:used] + axes[used + 1 :]
        counted = count_output_instances(seg, args.instance_min_size) if args.instances else None
        written = write_outputs(run, seg, record, levels=args.levels, instances=counted)
    drop_temporary_store(seg, plan.labels)
    what = summary(seg) + (f", {counted.count} instances" if counted is not None else "")
    return f"{image.label}: {what} -> {', '.join(shown(p) for p in written)}"


def shown(path: Path) -> str:
    """``path`` as the user would type it: relative to the current folder when inside it."""
    import os

    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return os.fspath(path)


def drop_temporary_store(seg: Any, labels: Path) -> None:
    """Remove the temporary zarr folder of a large run once its labels are written."""
    import shutil

    store = getattr(seg, "store", None)
    if store and Path(store).resolve() != labels.resolve():
        folder = Path(store).parent
        if folder.name.startswith("napari-diffcut-"):
            shutil.rmtree(folder, ignore_errors=True)


def add_segment_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``segment`` on the subcommand parsers."""
    from napari_diffcut.pipeline.options import add_segment_options

    seg = sub.add_parser(
        "segment",
        help="segment images (or a shipped sample): NAME.diffcut.tif + NAME.diffcut.json each",
        description="Segment each IMAGE (or --sample) and write NAME.diffcut.tif (labels), "
        "NAME.diffcut.json (the run record) and, with --levels, NAME.levels.tif into --out "
        "DIR (default: beside each input). One line per image when it is done. Exit "
        "status 2 on a user mistake.",
    )
    seg.add_argument(
        "image", nargs="*", metavar="IMAGE", help="input images (TIFF, PNG, JPEG, ...)"
    )
    seg.add_argument(
        "--sample",
        action="append",
        metavar="{blood-smear,nuclei}",
        choices=("blood-smear", "nuclei"),
        help="segment a synthetic sample image shipped with the package (no download); "
        "the same as napari's File > Open Sample; repeatable",
    )
    seg.add_argument(
        "--out",
        "-o",
        default=None,
        metavar="DIR",
        help="output folder, created if missing (default: beside each input); or, for one "
        "image, the label file FILE.tif / FILE.zarr",
    )
    seg.add_argument(
        "--levels", action="store_true", help="also write every hierarchy level (NAME.levels.tif)"
    )
    seg.add_argument(
        "--instances",
        action="store_true",
        help="also count objects: each connected piece outside the largest segment (the "
        "background) gets its own id (NAME.instances.tif) and a row of segment, area and "
        "centroid in NAME.instances.csv",
    )
    seg.add_argument(
        "--instance-min-size",
        type=at_least(1),
        default=16,
        metavar="PIXELS",
        help="with --instances: smaller pieces are dropped (default 16 pixels)",
    )
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    seg.add_argument("--quiet", "-q", action="store_true", help="no live stage line on stderr")
    add_segment_options(seg)
    seg.set_defaults(func=segment_images)
    return seg

