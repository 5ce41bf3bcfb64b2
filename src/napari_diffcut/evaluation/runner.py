"""Run a segmenter over a dataset, resumably, and score it (no torch, no napari).

Per image: read, crop and resize as the protocol says, predict, bring the
prediction to the score size, and keep the confusion histogram (method.md
9.2). Each image's record is appended to a JSONL file beside the results
JSON as soon as it is scored; a rerun with the same configuration skips the
images already there and recomputes every total from the stored histograms,
so an interrupted run loses at most the image in progress.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.evaluation.datasets import Dataset, semantic_truth
from napari_diffcut.evaluation.metrics import (
    MatchCounts,
    confusion_histogram,
    hungarian_counts,
    instance_counts,
    instance_scores,
    scores,
    total_counts,
)
from napari_diffcut.evaluation.protocols import Protocol, prepare, score_labels

#: Bumped when the JSONL records change meaning (old files are then refused).
FORMAT = 1

#: A segmenter: image -> labels (H, W), or (labels, extra JSON-able info).
Predictor = Callable[[NDArray[Any]], Any]


@dataclass(frozen=True)
class ImageProgress:
    """Reported after each image: position, its record, running dataset scores."""

    index: int
    total: int
    name: str
    record: dict[str, Any]
    miou: float
    pixel_accuracy: float
    skipped: int


def jsonl_path(out: str | os.PathLike[str]) -> Path:
    """Per-image JSONL beside the results JSON: ``OUT.json`` -> ``OUT.images.jsonl``.

    Only the last suffix is replaced, so ``run.a.json`` and ``run.b.json`` keep
    their records apart.
    """
    p = Path(out)
    return p.with_name(p.stem + ".images.jsonl")


def score_image(dataset: Dataset, truth: NDArray[Any], pred: NDArray[Any]) -> dict[str, Any]:
    """Record of one image: histogram, its own scores, instance counts."""
    classes = semantic_truth(dataset, truth)
    hist = confusion_histogram(classes, pred, dataset.n_class)
    counts, _ = hungarian_counts(hist)
    own = scores(counts)
    record: dict[str, Any] = {
        "hist": hist.tolist(),
        "labelled": counts.labelled,
        "segments": int(np.unique(pred).size),
        "miou": _finite(own.miou),
        "pixel_accuracy": _finite(own.pixel_accuracy),
    }
    if dataset.instances:
        record["instances"] = instance_counts(np.where(truth > 0, truth, 0), pred)
    return record


def _finite(x: float) -> float | None:
    """NaN -> None, so that the JSON stays standard."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def load_records(path: Path, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Image records of an earlier run with the same ``config`` (name -> record).

    A last line cut short by an interruption is ignored (that image is redone).

    Raises
    ------
    DiffCutError
        When the file was written with another configuration.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return {}
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = {}
    old = header.get("config") if header.get("kind") == "header" else None
    if old is None or _canonical(old) != _canonical(config):
        differ = sorted(
            k
            for k in set(config) | set(old or {})
            if _canonical((old or {}).get(k)) != _canonical(config.get(k))
        )
        raise DiffCutError(
            f"{path} holds results of another configuration (differs in: "
            f"{', '.join(differ) or 'format'}); pass --restart to discard them, or another --json"
        )
    records: dict[str, dict[str, Any]] = {}
    for i, line in enumerate(lines[1:], start=2):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                continue  # interrupted while writing: redo that image
            raise DiffCutError(f"{path}: line {i} is not valid JSON; pass --restart") from None
        if rec.get("kind") == "image":
            records[rec["name"]] = rec
    return records


class _Appender:
    """Appends one JSON line per image and forces it to disk."""

    def __init__(self, path: Path, header: dict[str, Any] | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if header is not None:
            path.write_text(json.dumps(header) + "\n", encoding="utf-8")
        elif path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            # Drop a partial last line left by an interruption.
            text = path.read_bytes()
            path.write_bytes(text[: text.rfind(b"\n") + 1])
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def _predict(predict: Predictor, image: NDArray[Any]) -> tuple[NDArray[Any], dict[str, Any]]:
    out = predict(image)
    labels, extra = out if isinstance(out, tuple) else (out, {})
    labels = np.asarray(labels)
    if labels.shape != np.shape(image)[:2]:
        raise DiffCutError(
            f"the segmenter returned labels of shape {labels.shape} for an image of "
            f"shape {np.shape(image)}; expected {np.shape(image)[:2]}"
        )
    return labels, dict(extra)


def _header_config(
    dataset: Dataset, protocol: Protocol, config: dict[str, Any] | None
) -> dict[str, Any]:
    """Everything that must be equal for stored per-image records to be reused."""
    return {
        "format": FORMAT,
        "dataset": dataset.name,
        "root": str(Path(dataset.root).resolve()),
        "n_class": dataset.n_class,
        "instances": dataset.instances,
        "protocol": protocol.as_dict(),
        **(config or {}),
    }


def iter_evaluate(
    dataset: Dataset,
    predict: Predictor,
    protocol: Protocol,
    *,
    out: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    restart: bool = False,
) -> Iterator[ImageProgress]:
    """Generator form of :func:`evaluate`: yields after each image.

    Images already in the JSONL (same configuration) are not run again; they
    are reported at the start (``skipped``) and included in the totals.
    """
    header_config = _header_config(dataset, protocol, config)
    path = jsonl_path(out) if out is not None else None
    done: dict[str, dict[str, Any]] = {}
    appender = None
    if path is not None:
        fresh = restart or not path.is_file() or path.stat().st_size == 0
        if not fresh:
            done = load_records(path, header_config)
        appender = _Appender(path, {"kind": "header", "config": header_config} if fresh else None)
    names = [s.name for s in dataset.samples]
    running = total_counts(
        (np.asarray(done[n]["hist"]) for n in names if n in done), dataset.n_class
    )
    skipped = sum(n in done for n in names)
    try:
        for index, sample in enumerate(dataset.samples, start=1):
            if sample.name in done:
                continue
            record = _run_one(dataset, predict, protocol, sample)
            if appender is not None:
                appender.write(record)
            done[sample.name] = record
            running = running + hungarian_counts(np.asarray(record["hist"]))[0]
            s = scores(running)
            yield ImageProgress(
                index,
                len(names),
                sample.name,
                record,
                s.miou,
                s.pixel_accuracy,
                skipped,
            )
    finally:
        if appender is not None:
            appender.close()


def _run_one(
    dataset: Dataset, predict: Predictor, protocol: Protocol, sample: Any
) -> dict[str, Any]:
    from napari_diffcut.files.io import read_image

    image = read_image(sample.image)
    truth = dataset.load_truth(sample.mask)
    image, truth = prepare(image, truth, protocol)
    start = time.perf_counter()
    labels, extra = _predict(predict, image)
    seconds = time.perf_counter() - start
    pred = score_labels(labels, protocol)
    record = {
        "kind": "image",
        "name": sample.name,
        **score_image(dataset, truth, pred),
        "seconds": round(seconds, 4),
    }
    if extra:
        record["extra"] = extra
    return record


def summarize(
    dataset: Dataset,
    protocol: Protocol,
    records: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Dataset results from per-image records (only the dataset's samples count)."""
    chosen = [records[s.name] for s in dataset.samples if s.name in records]
    counts: MatchCounts = total_counts((np.asarray(r["hist"]) for r in chosen), dataset.n_class)
    sc = scores(counts)
    per_class = [
        {
            "class": name,
            "iou": _finite(float(sc.iou[c])),
            "tp": int(counts.tp[c]),
            "fp": int(counts.fp[c]),
            "fn": int(counts.fn[c]),
        }
        for c, name in enumerate(dataset.class_names)
    ]
    result: dict[str, Any] = {
        "dataset": dataset.name,
        "root": str(dataset.root),
        "protocol": protocol.as_dict(),
        "n_class": dataset.n_class,
        "n_images": len(chosen),
        "n_selected": len(dataset.samples),
        "complete": len(chosen) == len(dataset.samples),
        "miou": _finite(sc.miou),
        "pixel_accuracy": _finite(sc.pixel_accuracy),
        "labelled_pixels": counts.labelled,
        "mean_segments": _finite(
            float(np.mean([r["segments"] for r in chosen])) if chosen else math.nan
        ),
        "seconds_per_image": _finite(
            float(np.mean([r["seconds"] for r in chosen])) if chosen else math.nan
        ),
        "per_class": per_class,
        "dataset_info": dataset.info,
    }
    if dataset.instances:
        result["instances"] = {
            k: _finite(v) for k, v in instance_scores(r["instances"] for r in chosen).items()
        }
    return result


def machine_info() -> dict[str, Any]:
    """Where and when the numbers were made."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def evaluate(
    dataset: Dataset,
    predict: Predictor,
    protocol: Protocol,
    *,
    out: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    restart: bool = False,
    progress: Callable[[ImageProgress], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a segmenter on a dataset, resumably; write and return the results.

    Parameters
    ----------
    dataset : Dataset
        From :func:`~napari_diffcut.evaluation.datasets.coco_stuff_27`,
        ``cityscapes`` or ``folder``.
    predict : callable
        Image (as the protocol prepares it) -> labels of the same (H, W), or
        ``(labels, extra)`` with a JSON-serialisable ``extra`` dict.
    protocol : Protocol
        Crop and resolutions.
    out : path, optional
        Results JSON; per-image records go to ``OUT.images.jsonl`` beside it,
        which makes the run resumable. None: nothing is written.
    config : dict, optional
        Everything else that defines the run (segmenter settings); a rerun
        resumes only when it is equal.
    restart : bool
        Discard earlier per-image records.
    progress : callable, optional
        Called with an :class:`ImageProgress` after each image.
    meta : dict, optional
        Extra fields for the results (command line, device...).

    Returns
    -------
    dict
        Results: ``miou``, ``pixel_accuracy`` (fractions), ``per_class``,
        ``instances`` (instance masks), counts, protocol, configuration.
    """
    records: dict[str, dict[str, Any]] = {}
    gen = iter_evaluate(dataset, predict, protocol, out=out, config=config, restart=restart)
    for event in gen:
        records[event.name] = event.record
        if progress is not None:
            progress(event)
    ran = len(records)
    if out is not None:
        # Totals always come from the stored histograms, old and new alike.
        records = load_records(jsonl_path(out), _header_config(dataset, protocol, config))
    result = summarize(dataset, protocol, records)
    result["images_run"] = ran
    result["images_reused"] = result["n_images"] - ran
    result["config"] = config or {}
    result["machine"] = machine_info()
    if meta:
        result.update(meta)
    if out is not None:
        from napari_diffcut.files.io import write_json

        result["per_image_results"] = str(jsonl_path(out))
        write_json(out, result)
    return result
