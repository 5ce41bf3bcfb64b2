"""Evaluation harness: metrics against hand-computed values, dataset layouts,
the peers' crops and resizes, resumable runs, and the ``evaluate`` command."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_diffcut.cli.main import main
from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.evaluation import datasets as ds
from napari_diffcut.evaluation import protocols as pr
from napari_diffcut.evaluation.metrics import (
    confusion_histogram,
    hungarian_counts,
    image_scores,
    instance_counts,
    instance_scores,
    scores,
    total_counts,
)
from napari_diffcut.evaluation.runner import evaluate, jsonl_path

# ----------------------------------------------------------------------------- metrics


def test_perfect_prediction_scores_one() -> None:
    truth = np.array([[0, 0, 1], [2, 2, 1]])
    s = image_scores(truth, truth + 7, 3)
    assert s.miou == 1.0
    assert s.pixel_accuracy == 1.0


def test_permuted_labels_still_score_one() -> None:
    truth = np.repeat(np.arange(4), 5).reshape(4, 5)
    perm = np.array([30, 2, 11, 5])
    s = image_scores(truth, perm[truth], 4)
    assert s.miou == pytest.approx(1.0)
    assert s.pixel_accuracy == pytest.approx(1.0)


def test_partial_overlap_exact_values() -> None:
    # truth [0 0 1 1], pred [a a a b]: hist [[2, 0], [1, 1]], identity match.
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[5, 5, 5, 9]])
    hist = confusion_histogram(truth, pred, 2)
    np.testing.assert_array_equal(hist, [[2, 0], [1, 1]])
    counts, match = hungarian_counts(hist)
    np.testing.assert_array_equal(match, [0, 1])
    np.testing.assert_array_equal(counts.tp, [2, 1])
    np.testing.assert_array_equal(counts.fp, [1, 0])
    np.testing.assert_array_equal(counts.fn, [0, 1])
    s = scores(counts)
    np.testing.assert_allclose(s.iou, [2 / 3, 1 / 2])
    assert s.miou == pytest.approx(7 / 12)
    assert s.pixel_accuracy == pytest.approx(3 / 4)


def test_unmatched_segments_are_dropped() -> None:
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 2, 3]])  # four segments, two classes
    counts, _ = hungarian_counts(confusion_histogram(truth, pred, 2))
    np.testing.assert_array_equal(counts.tp, [1, 1])
    np.testing.assert_array_equal(counts.fn, [1, 1])
    np.testing.assert_array_equal(counts.fp, [0, 0])
    assert scores(counts).miou == pytest.approx(0.5)


def test_ignore_label_and_absent_classes() -> None:
    truth = np.array([[0, 0, 255, 255]])
    pred = np.array([[1, 1, 2, 3]])
    counts, _ = hungarian_counts(confusion_histogram(truth, pred, 3))
    assert counts.labelled == 2
    s = scores(counts)
    assert s.iou[0] == 1.0
    assert np.isnan(s.iou[1]) and np.isnan(s.iou[2])  # never seen, nothing charged
    assert s.miou == 1.0 and s.pixel_accuracy == 1.0


def test_leftover_segment_charged_to_absent_class_like_the_peers() -> None:
    # Two classes, only class 0 present, two segments: class 1 is matched to the
    # leftover segment, whose pixels become its false positives (method.md 9.2).
    truth = np.array([[0, 0, 0, 0]])
    pred = np.array([[0, 0, 1, 1]])
    s = image_scores(truth, pred, 2)
    np.testing.assert_allclose(s.iou, [0.5, 0.0])
    assert s.miou == pytest.approx(0.25)
    assert s.pixel_accuracy == pytest.approx(0.5)


def _brute_force(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP/FP/FN of the best one-to-one class -> segment assignment, by enumeration."""
    n, m = hist.shape
    rows = np.arange(n)
    best = max(itertools.permutations(range(m), n), key=lambda c: hist[rows, list(c)].sum())
    cols = np.array(best)
    tp = hist[rows, cols]
    return tp, hist[:, cols].sum(0) - tp, hist.sum(1) - tp


def test_hungarian_equals_exhaustive_search(rng: np.random.Generator) -> None:
    for _ in range(25):
        n, m = int(rng.integers(2, 5)), int(rng.integers(5, 7))
        # Distinct large counts: the optimal assignment is unique (no ties).
        hist = rng.choice(10**6, size=n * m, replace=False).reshape(n, m)
        counts, _ = hungarian_counts(hist)
        for got, want in zip((counts.tp, counts.fp, counts.fn), _brute_force(hist), strict=True):
            np.testing.assert_array_equal(got, want)
        assert counts.labelled == hist.sum()


def _diffseg_counts(pred: np.ndarray, label: np.ndarray, n_class: int) -> tuple:
    """DiffSeg's ``_fast_hist`` + ``hungarian_matching`` (diffseg/utils.py), one image."""
    from scipy.optimize import linear_sum_assignment

    label, pred = label.ravel(), pred.ravel()
    width = np.maximum(n_class, pred.max() + 1)
    mask = (label >= 0) & (label < n_class)
    hist = np.bincount(width * label[mask] + pred[mask], minlength=n_class * width)
    hist = hist.reshape(n_class, width)
    row, col = linear_sum_assignment(hist, maximize=True)
    tp = hist[row, col]
    fn = hist.sum(1) - tp
    fp = hist[:, col].sum(0) - np.diag(hist[:, col])
    return tp, fp, fn, hist.sum()


def test_counts_equal_diffseg_reference_code_with_ties(rng: np.random.Generator) -> None:
    """Same TP/FP/FN as the peers' code, ties included, for 0..K-1 predictions."""
    for _ in range(30):
        n_class, k = int(rng.integers(2, 6)), int(rng.integers(1, 9))
        label = rng.integers(0, n_class + 1, (6, 7))  # value n_class: unlabelled
        label[rng.random(label.shape) < 0.1] = 255
        pred = rng.integers(0, k, (6, 7))
        pred = np.unique(pred, return_inverse=True)[1].reshape(pred.shape)  # 0..K-1, no gaps
        counts, _ = hungarian_counts(confusion_histogram(label, pred * 10 + 3, n_class))
        tp, fp, fn, total = _diffseg_counts(pred, label, n_class)
        for got, want in zip((counts.tp, counts.fp, counts.fn), (tp, fp, fn), strict=True):
            np.testing.assert_array_equal(got, want)
        assert counts.labelled == total


def test_histogram_renumbers_predictions(rng: np.random.Generator) -> None:
    truth = rng.integers(0, 3, (9, 11))
    pred = rng.integers(0, 5, (9, 11))
    hist = confusion_histogram(truth, pred * 100 + 7, 3)  # node-id-like label values
    np.testing.assert_array_equal(hist, confusion_histogram(truth, pred, 3))
    assert hist.shape == (3, max(3, len(np.unique(pred))))


def test_dataset_totals_pool_counts_over_images() -> None:
    a_truth, a_pred = np.array([[0, 0, 1, 1]]), np.array([[0, 0, 0, 1]])
    b_truth, b_pred = np.array([[1, 1, 1, 1]]), np.array([[4, 4, 4, 4]])
    hists = [confusion_histogram(a_truth, a_pred, 2), confusion_histogram(b_truth, b_pred, 2)]
    total = total_counts(hists, 2)
    # image a: tp [2, 1], fp [1, 0], fn [0, 1]; image b: class 1 -> the only segment, tp 4.
    np.testing.assert_array_equal(total.tp, [2, 5])
    np.testing.assert_array_equal(total.fp, [1, 0])
    np.testing.assert_array_equal(total.fn, [0, 1])
    s = scores(total)
    np.testing.assert_allclose(s.iou, [2 / 3, 5 / 6])
    assert s.pixel_accuracy == pytest.approx(7 / 8)


def _squares(shape: tuple[int, int], boxes: list[tuple[int, int, int]]) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    for i, (r, c, side) in enumerate(boxes, start=1):
        out[r : r + side, c : c + side] = i
    return out


def test_instance_counts_exact() -> None:
    truth = _squares((12, 12), [(1, 1, 4), (6, 6, 4)])
    # One segment covering both nuclei: two objects after connected components.
    pred = np.where(truth > 0, 7, 3)
    c = instance_counts(truth, pred)
    assert c == {
        "fg_intersection": 32,
        "fg_union": 32,
        "objects_true": 2,
        "objects_pred": 2,
        "objects_matched": 2,
    }
    # Shifted by one column: overlap 12 of 16, IoU 12 / 20 = 0.6 > 0.5, still a match.
    one = _squares((12, 12), [(1, 1, 4)])
    c = instance_counts(one, np.where(_squares((12, 12), [(1, 2, 4)]) > 0, 2, 1))
    assert c["objects_matched"] == 1
    assert c["fg_intersection"] / c["fg_union"] == pytest.approx(12 / 20)
    # Shifted by two: half of the segment is background, so it is not foreground.
    c = instance_counts(one, np.where(_squares((12, 12), [(1, 3, 4)]) > 0, 2, 1))
    assert c["objects_pred"] == 0 and c["objects_matched"] == 0 and c["fg_intersection"] == 0
    agg = instance_scores(
        [
            {
                "fg_intersection": 8,
                "fg_union": 10,
                "objects_true": 3,
                "objects_pred": 1,
                "objects_matched": 1,
            },
            {
                "fg_intersection": 2,
                "fg_union": 10,
                "objects_true": 1,
                "objects_pred": 3,
                "objects_matched": 1,
            },
        ]
    )
    assert agg["fg_iou"] == pytest.approx(0.5)
    assert agg["fg_iou_mean"] == pytest.approx(0.5)
    assert agg["object_f1"] == pytest.approx(2 * 2 / 8)


@pytest.mark.parametrize(
    "module", ["napari_diffcut.evaluation.metrics", "napari_diffcut.evaluation.protocols"]
)
def test_doctests(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


# ----------------------------------------------------------------------------- crops, resizes


def test_crop_boxes_follow_the_peers() -> None:
    assert pr.crop_box((480, 640), "diffseg") == (0, 80, 480)
    assert pr.crop_box((640, 480), "diffseg") == (80, 0, 480)
    # torchvision CenterCrop(min - 1): round half to even.
    assert pr.crop_box((480, 640), "diffcut") == (0, 80, 479)  # round(80.5) == 80
    assert pr.crop_box((480, 643), "diffcut") == (0, 82, 479)  # round(82.0)
    assert pr.crop_box((480, 642), "diffcut") == (0, 82, 479)  # round(81.5) == 82


def test_resizes_match_torch() -> None:
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 50, (37, 37))
    t = torch.from_numpy(labels[None, None].astype(np.float32))
    for size in (16, 64):
        ref = F.interpolate(t, size=(size, size), mode="nearest-exact")[0, 0].numpy()
        np.testing.assert_array_equal(pr.resize_nearest(labels, size, "exact"), ref)
        ref = F.interpolate(t, size=(size, size), mode="nearest")[0, 0].numpy()
        np.testing.assert_array_equal(pr.resize_nearest(labels, size, "floor"), ref)
    image = rng.random((37, 37, 3)).astype(np.float32)
    ti = torch.from_numpy(image.transpose(2, 0, 1)[None])
    for size in (16, 64):
        ref = (
            F.interpolate(
                ti, size=(size, size), mode="bilinear", align_corners=False, antialias=False
            )[0]
            .numpy()
            .transpose(1, 2, 0)
        )
        np.testing.assert_allclose(pr.resize_bilinear(image, size), ref, atol=1e-5)
    as_uint8 = pr.resize_bilinear((image * 255).astype(np.uint8), 16)
    assert as_uint8.dtype == np.uint8


def test_prepare_diffcut_protocol_sizes() -> None:
    image = np.zeros((30, 40, 3), np.uint8)
    truth = np.arange(30 * 40).reshape(30, 40) % 7
    p = pr.Protocol("diffcut", "diffcut", 64, 16)
    img, lab = pr.prepare(image, truth, p)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert lab.shape == (16, 16)
    assert pr.score_labels(np.zeros((64, 64), int), p).shape == (16, 16)
    assert pr.make_protocol("diffseg", input_size=256).score_size == 256
    # DiffCut scores at 128 whatever its input size (eval_diffcut.py mask_size).
    assert pr.make_protocol("diffcut", input_size=512).score_size == 128
    assert pr.make_protocol("diffcut", score_size=64).input_size == 1024
    with pytest.raises(ValueError, match="protocol"):
        pr.make_protocol("nope")


# ----------------------------------------------------------------------------- layouts


def _two_tone(h: int, w: int, split: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :split] = (20, 30, 200)
    img[:, split:] = (230, 200, 40)
    return img


def _coco_root(root: Path, n: int, layout: str = "ours") -> list[str]:
    ids = [f"{i:012d}" for i in ds.cocostuff27()["val2017_ids"][:n]]
    if layout == "ours":
        img_dir = root / "images" / "val2017"
        lab_dir = root / "annotations" / "stuffthingmaps_trainval2017" / "val2017"
    else:  # DiffSeg
        img_dir, lab_dir = root / "val2017", root / "annotation_val2017"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for k, ident in enumerate(ids):
        split = 20 + 6 * k
        iio.imwrite(img_dir / f"{ident}.jpg", _two_tone(48, 64, split), quality=95)
        fine = np.full((48, 64), 156, np.uint8)  # sky-other -> sky (23)
        fine[:, split:] = 0  # person -> person (9)
        fine[:2] = 255  # unlabelled
        iio.imwrite(lab_dir / f"{ident}.png", fine)
    return ids


def test_cocostuff27_data_is_complete() -> None:
    data = ds.cocostuff27()
    assert len(data["val2017_ids"]) == 2175 == len(set(data["val2017_ids"]))
    assert len(data["fine_to_coarse"]) == 182
    assert sorted(set(data["fine_to_coarse"])) == list(range(27))
    assert len(data["coarse_names"]) == 27
    assert data["coarse_names"][9] == "person" and data["coarse_names"][23] == "sky"


@pytest.mark.parametrize("layout", ["ours", "diffseg"])
def test_coco_layout_and_mapping(tmp_path: Path, layout: str) -> None:
    ids = _coco_root(tmp_path, 2, layout)
    d = ds.coco_stuff_27(tmp_path, limit=2)
    assert [s.name for s in d.samples] == ids
    truth = d.load_truth(d.samples[0].mask)
    assert set(np.unique(truth).tolist()) == {9, 23, 255}
    with pytest.raises(DiffCutError, match="missing"):
        ds.coco_stuff_27(tmp_path, limit=3)
    assert len(ds.coco_stuff_27(tmp_path, limit=3, allow_missing=True).samples) == 2
    (tmp_path / "list.txt").write_text(ids[1] + "\n")
    assert [
        s.name for s in ds.coco_stuff_27(tmp_path, image_list=tmp_path / "list.txt").samples
    ] == ids[1:]
    (tmp_path / "list.txt").write_text(f"{ids[1]}\n{ids[0]}\n{ids[1]}\n")
    with pytest.raises(DiffCutError, match=f"more than once .first: {ids[1]}"):
        ds.coco_stuff_27(tmp_path, image_list=tmp_path / "list.txt")


def _cityscapes_root(root: Path, n: int) -> None:
    for k in range(n):
        city = ["aachen", "bremen"][k % 2]
        stem = f"{city}_000000_{k:06d}"
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        iio.imwrite(
            root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", _two_tone(40, 80, 40)
        )
        ids = np.full((40, 80), 7, np.uint8)  # road -> 0
        ids[:, 40:] = 26  # car -> 19
        ids[:3] = 1  # ego vehicle -> ignored
        iio.imwrite(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", ids)


def test_cityscapes_layout_and_mapping(tmp_path: Path) -> None:
    _cityscapes_root(tmp_path, 3)
    d = ds.cityscapes(tmp_path)
    assert [s.name for s in d.samples] == [
        "aachen/aachen_000000_000000",
        "aachen/aachen_000000_000002",
        "bremen/bremen_000000_000001",
    ]
    assert set(np.unique(d.load_truth(d.samples[0].mask)).tolist()) == {0, 19, 255}
    assert d.class_names[19] == "car" and d.n_class == 27


def _folder_root(root: Path, n: int, *, tif: bool = False, masks: str = "masks") -> None:
    (root / "images").mkdir(parents=True)
    (root / masks).mkdir()
    for k in range(n):
        boxes = [(4 + k, 4, 12), (30, 28 - k, 14), (8, 40, 10)]
        inst = _squares((56, 56), boxes)
        img = np.where(inst > 0, 210, 25).astype(np.uint8)
        iio.imwrite(root / "images" / f"cell{k}.png", img)
        if tif:
            tifffile.imwrite(root / masks / f"cell{k}.tif", inst.astype(np.uint16))
        else:
            iio.imwrite(root / masks / f"cell{k}.png", inst.astype(np.uint16))


def test_folder_layouts(tmp_path: Path) -> None:
    _folder_root(tmp_path / "a", 2, tif=True, masks="labels")
    d = ds.folder(tmp_path / "a", instances=True)
    assert [s.name for s in d.samples] == ["cell0", "cell1"] and d.n_class == 2
    assert int(d.load_truth(d.samples[0].mask).max()) == 3
    sem = ds.folder(tmp_path / "a")  # semantic: values 0..3 are 4 classes
    assert sem.n_class == 4
    # Semantic masks with sparse values: each value present is a class.
    _folder_root(tmp_path / "b", 1)
    binary = np.where(iio.imread(tmp_path / "b" / "masks" / "cell0.png") > 0, 255, 0)
    iio.imwrite(tmp_path / "b" / "masks" / "cell0.png", binary.astype(np.uint8))
    assert ds.folder(tmp_path / "b").n_class == 1  # 255 is unlabelled by default
    two = ds.folder(tmp_path / "b", ignore_index=-1)
    assert two.class_names == ["0", "255"]
    np.testing.assert_array_equal(two.load_truth(two.samples[0].mask), binary // 255)
    # Names keep all but their last suffix (and .ome): img.001 and img.002 stay apart.
    c = tmp_path / "c"
    (c / "images").mkdir(parents=True)
    (c / "masks").mkdir()
    for k in (1, 2):
        inst = _squares((24, 24), [(2 + k, 2, 8)])
        iio.imwrite(c / "images" / f"img.00{k}.png", np.where(inst > 0, 210, 25).astype(np.uint8))
        tifffile.imwrite(c / "masks" / f"img.00{k}.ome.tif", inst.astype(np.uint16))
    pairs = [(s.name, s.image.name, s.mask.name) for s in ds.folder(c, instances=True).samples]
    assert pairs == [
        ("img.001", "img.001.png", "img.001.ome.tif"),
        ("img.002", "img.002.png", "img.002.ome.tif"),
    ]
    (tmp_path / "a" / "images" / "extra.png").write_bytes(
        (tmp_path / "a" / "images" / "cell0.png").read_bytes()
    )
    with pytest.raises(DiffCutError, match="no mask"):
        ds.folder(tmp_path / "a")
    # Two images with one name would be scored under one name: refused.
    (tmp_path / "a" / "images" / "extra.png").rename(tmp_path / "a" / "images" / "cell0.tif")
    with pytest.raises(DiffCutError, match="cell0.png and cell0.tif .* same name 'cell0'"):
        ds.folder(tmp_path / "a")


# ----------------------------------------------------------------------------- runner


def _colour_predictor(
    calls: list[int], stop_after: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A deterministic non-diffusion segmenter: quantised grey level."""

    def predict(image: np.ndarray) -> np.ndarray:
        if stop_after is not None and len(calls) >= stop_after:
            raise KeyboardInterrupt
        calls.append(1)
        grey = image if image.ndim == 2 else image[..., :3].mean(-1)
        return (np.asarray(grey) // 64).astype(np.int32)

    return predict


def test_resume_after_interruption_equals_clean_run(tmp_path: Path) -> None:
    _folder_root(tmp_path / "data", 5)
    d = ds.folder(tmp_path / "data", instances=True)
    p = pr.make_protocol("native")
    clean = evaluate(d, _colour_predictor([]), p, out=tmp_path / "clean.json", config={"k": 1})
    assert clean["n_images"] == 5 and clean["complete"]
    assert clean["miou"] == pytest.approx(1.0) and clean["instances"]["object_f1"] == pytest.approx(
        1.0
    )

    assert jsonl_path(tmp_path / "clean.json") == tmp_path / "clean.images.jsonl"
    assert jsonl_path("run.a.json") != jsonl_path("run.b.json")

    out = tmp_path / "resumed.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate(d, _colour_predictor([], stop_after=2), p, out=out, config={"k": 1})
    lines = jsonl_path(out).read_text().splitlines()
    assert len(lines) == 3  # header + 2 images
    with open(jsonl_path(out), "a") as fh:
        fh.write('{"kind": "image", "name": "cell2", "hi')  # cut short mid-write
    calls: list[int] = []
    resumed = evaluate(d, _colour_predictor(calls), p, out=out, config={"k": 1})
    assert len(calls) == 3 and resumed["images_reused"] == 2 and resumed["images_run"] == 3
    for key in ("miou", "pixel_accuracy", "per_class", "instances", "labelled_pixels", "n_images"):
        assert resumed[key] == clean[key]
    saved = json.loads(out.read_text())
    assert saved["miou"] == clean["miou"]
    assert len(jsonl_path(out).read_text().splitlines()) == 6

    calls.clear()
    again = evaluate(d, _colour_predictor(calls), p, out=out, config={"k": 1})
    assert calls == [] and again["images_reused"] == 5
    with pytest.raises(DiffCutError, match="restart"):
        evaluate(d, _colour_predictor([]), p, out=out, config={"k": 2})
    assert (
        evaluate(d, _colour_predictor(calls), p, out=out, config={"k": 2}, restart=True)[
            "images_run"
        ]
        == 5
    )


def test_semantic_folder_scores_exactly(tmp_path: Path) -> None:
    _folder_root(tmp_path / "data", 2)
    # Mask values 0..3; with 2 classes, 2 and 3 are out of range, hence unlabelled.
    d = ds.folder(tmp_path / "data", n_class=2)
    res = evaluate(d, _colour_predictor([]), pr.make_protocol("native"))
    # Background is one grey level, the squares another: class 1 (first square)
    # matches the squares' segment, whose other pixels are unlabelled.
    assert res["miou"] == pytest.approx(1.0)
    assert res["labelled_pixels"] == sum(
        int(np.count_nonzero(d.load_truth(s.mask) >= 0)) for s in d.samples
    )


# ----------------------------------------------------------------------------- command line


def test_cli_coco_layout_pixels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _coco_root(tmp_path / "coco", 2)
    out = tmp_path / "res" / "coco.json"
    rc = main(
        [
            "evaluate",
            "--dataset",
            "coco-stuff-27",
            "--root",
            str(tmp_path / "coco"),
            "--limit",
            "2",
            "--backbone",
            "pixels",
            "--max-depth",
            "1",
            "--input-size",
            "64",
            "--json",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 2 and res["protocol"]["input_size"] == 64
    assert res["config"]["settings"]["backbone"] == "pixels"
    # Two flat colours = two classes; the first NCut split finds them.
    assert res["pixel_accuracy"] > 0.9
    assert {r["class"] for r in res["per_class"] if r["iou"] is not None} == {"person", "sky"}
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "person" in printed
    records = [json.loads(x) for x in jsonl_path(out).read_text().splitlines()[1:]]
    assert [r["name"] for r in records] == [
        f"{i:012d}" for i in ds.cocostuff27()["val2017_ids"][:2]
    ]


def test_cli_folder_instances_resume_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _folder_root(tmp_path / "data", 2)
    out = tmp_path / "cells.json"
    base = [
        "evaluate",
        "--dataset",
        "folder",
        "--root",
        str(tmp_path / "data"),
        "--instances",
        "--backbone",
        "pixels",
        "--max-depth",
        "2",
        "--json",
        str(out),
    ]
    assert main([*base, "--limit", "1"]) == 0
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "resuming: 1 image(s) already scored" in err
    res = json.loads(out.read_text())
    assert res["n_images"] == 2 and res["images_reused"] == 1 and res["images_run"] == 1
    inst = res["instances"]
    assert 0 <= inst["fg_iou"] <= 1 and inst["objects_true"] == 6
    assert main([*base, "--threshold", "0.5"]) == 2
    assert "--restart" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                "coco-stuff-27",
                "--root",
                str(tmp_path / "none"),
                "--backbone",
                "pixels",
            ]
        )
        == 2
    )
    assert "no COCO image folder" in capsys.readouterr().err
    coco = [
        "evaluate",
        "--dataset",
        "coco-stuff-27",
        "--root",
        str(tmp_path),
        "--ignore-index",
        "0",
    ]
    assert main(coco) == 2
    assert "apply to --dataset folder only" in capsys.readouterr().err


def test_cli_cityscapes_layout_tiny_model(tmp_path: Path, tiny_model: Path) -> None:
    _cityscapes_root(tmp_path / "cs", 2)
    out = tmp_path / "cs.json"
    rc = main(
        [
            "evaluate",
            "--dataset",
            "cityscapes",
            "--root",
            str(tmp_path / "cs"),
            "--model",
            str(tiny_model),
            "--device",
            "cpu",
            "--max-depth",
            "2",
            "--protocol",
            "diffcut",
            "--input-size",
            "128",
            "--score-size",
            "32",
            "--json",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 2 and res["config"]["settings"]["backbone"] == "diffusion"
    assert res["run"]["device_used"] == "cpu"
    assert 0.0 <= res["pixel_accuracy"] <= 1.0
    first = json.loads(jsonl_path(out).read_text().splitlines()[1])
    hist = np.asarray(first["hist"])
    d = ds.cityscapes(tmp_path / "cs")
    image = iio.imread(d.samples[0].image)
    _, truth = pr.prepare(
        image, d.load_truth(d.samples[0].mask), pr.make_protocol("diffcut", 128, 32)
    )
    assert truth.shape == (32, 32)
    assert hist.shape[0] == 27 and hist.sum() == first["labelled"] == np.count_nonzero(truth < 27)
