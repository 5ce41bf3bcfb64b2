"""Scores of an unsupervised segmentation against ground truth (numpy/scipy only).

Semantic scores follow DiffSeg and DiffCut exactly (method.md 9.2; both adapt
PiCIE's code): per image, a confusion histogram between ground-truth classes
and predicted segments, a Hungarian assignment that maximises matched pixels,
and TP/FP/FN counts accumulated over the dataset; then IoU per class, mIoU
ignoring NaN, and pixel accuracy.

Instance scores (for instance label maps, e.g. nuclei) are the usual
microscopy figures: foreground IoU and object F1 at IoU > 0.5.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

#: Pixel value of "unlabelled" in label maps after mapping (COCO-Stuff's 255).
IGNORE = 255


def confusion_histogram(
    truth: NDArray[np.integer], pred: NDArray[np.integer], n_class: int
) -> NDArray[np.int64]:
    """Confusion histogram between ground-truth classes and predicted segments.

    Parameters
    ----------
    truth : ndarray of int, shape (H, W)
        Class per pixel; values outside ``[0, n_class)`` (255, -1) are unlabelled
        and left out, as in the peers' ``_fast_hist``.
    pred : ndarray of int, shape (H, W)
        Segment label per pixel, any integer values.
    n_class : int
        Number of ground-truth classes.

    Returns
    -------
    ndarray of int64, shape (n_class, max(n_class, K))
        ``hist[c, s]`` = labelled pixels of class ``c`` in segment ``s``, where
        the K distinct predicted labels are renumbered 0..K-1 in increasing order.

    Notes
    -----
    The peers' histogram has ``max(n_class, pred.max() + 1)`` columns. Their
    predictions are numbered 0..K-1; ours carry tree node ids + 1, so they are
    renumbered first. The width (hence ties in the assignment) is then the same
    as the peers' for the same partition.
    """
    t = np.asarray(truth).ravel()
    p = np.asarray(pred).ravel()
    if t.shape != p.shape:
        raise ValueError(
            f"truth and pred must have the same shape, got {np.shape(truth)} and {np.shape(pred)}"
        )
    if n_class < 1:
        raise ValueError(f"n_class must be >= 1, got {n_class}")
    _, seq = np.unique(p, return_inverse=True)
    seq = seq.ravel()
    width = max(n_class, int(seq.max()) + 1 if seq.size else 0)
    labelled = (t >= 0) & (t < n_class)
    flat = width * t[labelled].astype(np.int64) + seq[labelled]
    return np.bincount(flat, minlength=n_class * width).reshape(n_class, width).astype(np.int64)


@dataclass(frozen=True)
class MatchCounts:
    """Per-class pixel counts of one Hungarian matching (or of a dataset).

    Attributes
    ----------
    tp, fp, fn : ndarray of int64, shape (n_class,)
        Matched pixels; pixels of the matched segment outside the class;
        pixels of the class outside its matched segment.
    labelled : int
        Labelled pixels (the denominator of pixel accuracy).
    """

    tp: NDArray[np.int64]
    fp: NDArray[np.int64]
    fn: NDArray[np.int64]
    labelled: int

    def __add__(self, other: MatchCounts) -> MatchCounts:
        return MatchCounts(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.labelled + other.labelled,
        )


def hungarian_counts(
    hist: NDArray[np.integer],
) -> tuple[MatchCounts, NDArray[np.int64]]:
    """Match classes to segments maximising matched pixels; count TP, FP, FN.

    This is the peers' ``hungarian_matching`` for one image (method.md 9.2):
    ``linear_sum_assignment(hist, maximize=True)`` gives every class one
    distinct segment (the histogram has at least as many columns as rows);
    ``TP = hist[c, m(c)]``, ``FN = row sum - TP``, ``FP = column sum of m(c) - TP``.
    Segments no class is matched to are dropped: their pixels count only as FN.
    A class absent from the image may be matched to a leftover segment, whose
    pixels then count as its FP, exactly as in the peers' code.

    Parameters
    ----------
    hist : ndarray, shape (n_class, n_segments), n_segments >= n_class
        From :func:`confusion_histogram`.

    Returns
    -------
    counts : MatchCounts
    match : ndarray of int64, shape (n_class,)
        Column (renumbered segment) matched to each class.
    """
    from scipy.optimize import linear_sum_assignment

    h = np.asarray(hist, np.int64)
    if h.ndim != 2 or h.shape[1] < h.shape[0]:
        raise ValueError(f"hist must be (n_class, n_segments >= n_class), got shape {h.shape}")
    rows, cols = linear_sum_assignment(h, maximize=True)
    tp = h[rows, cols]
    fn = h.sum(1) - tp
    fp = h[:, cols].sum(0) - tp
    return MatchCounts(tp, fp, fn, int(h.sum())), cols.astype(np.int64)


def total_counts(hists: Iterable[NDArray[np.integer]], n_class: int) -> MatchCounts:
    """Sum of :func:`hungarian_counts` over images (matching stays per image)."""
    zero = np.zeros(n_class, np.int64)
    total = MatchCounts(zero, zero, zero, 0)
    for hist in hists:
        total = total + hungarian_counts(hist)[0]
    return total


@dataclass(frozen=True)
class Scores:
    """Dataset scores from accumulated counts.

    Attributes
    ----------
    iou : ndarray of float64, shape (n_class,)
        TP / (TP + FP + FN); NaN for a class never seen nor predicted.
    miou : float
        Mean of ``iou`` ignoring NaN (NaN when every class is NaN).
    pixel_accuracy : float
        Sum of TP over labelled pixels (NaN without labelled pixels).
    """

    iou: NDArray[np.float64]
    miou: float
    pixel_accuracy: float


def scores(counts: MatchCounts) -> Scores:
    """IoU per class, mIoU (NaN ignored) and pixel accuracy, as the peers compute them."""
    tp = counts.tp.astype(np.float64)
    denom = tp + counts.fp + counts.fn
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    acc = float(tp.sum() / counts.labelled) if counts.labelled else float("nan")
    return Scores(iou, miou, acc)


def image_scores(truth: NDArray[np.integer], pred: NDArray[np.integer], n_class: int) -> Scores:
    """:func:`scores` of a single image (convenience for scripts and tests).

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.array([[0, 0, 1, 1]])
    >>> s = image_scores(truth, np.array([[7, 7, 7, 3]]), n_class=2)
    >>> s.iou.round(4).tolist(), round(s.miou, 4), s.pixel_accuracy
    ([0.6667, 0.5], 0.5833, 0.75)
    >>> image_scores(truth, np.array([[4, 4, 2, 2]]), n_class=2).miou  # labels permuted
    1.0
    """
    return scores(hungarian_counts(confusion_histogram(truth, pred, n_class))[0])


# ----------------------------------------------------------------------------- instances


def foreground_segments(
    truth_fg: NDArray[np.bool_], pred: NDArray[np.integer]
) -> NDArray[np.integer]:
    """Predicted labels whose pixels are mostly ground-truth foreground.

    A segmentation without classes has no "background" segment; the usual
    many-to-one assignment calls a segment foreground when more than half of
    its pixels are foreground in the ground truth (like the Hungarian matching,
    this uses the ground truth to name segments, never to draw them).
    """
    p = np.asarray(pred).ravel()
    labels, inv, size = np.unique(p, return_inverse=True, return_counts=True)
    fg = np.bincount(
        inv.ravel(),
        weights=np.asarray(truth_fg).ravel().astype(np.float64),
        minlength=labels.size,
    )
    return labels[fg * 2 > size]


def predicted_objects(
    pred: NDArray[np.integer], fg_labels: NDArray[np.integer]
) -> NDArray[np.int32]:
    """Objects of a prediction: the connected components of each foreground segment.

    A segment of a zero-shot segmentation is a region type (e.g. "nucleus"), not
    one object; its 4-connected components are the predicted objects.

    Returns
    -------
    ndarray of int32, shape (H, W)
        0 = background, 1..N = objects.
    """
    from scipy import ndimage

    objects = np.zeros(np.shape(pred), np.int32)
    n = 0
    for label in np.asarray(fg_labels).tolist():
        comp, k = ndimage.label(np.asarray(pred) == label)
        objects[comp > 0] = comp[comp > 0] + n
        n += k
    return objects


def matched_objects(
    truth: NDArray[np.integer], objects: NDArray[np.integer], iou: float = 0.5
) -> int:
    """Number of ground-truth instances with a predicted object of IoU > ``iou``.

    With ``iou >= 0.5`` a match is unique on both sides, so no assignment step
    is needed. ``0`` is background in both maps.
    """
    if not 0.5 <= iou < 1.0:
        raise ValueError(f"iou must be in [0.5, 1) so that matches are unique, got {iou}")
    t = np.asarray(truth).ravel().astype(np.int64)
    o = np.asarray(objects).ravel().astype(np.int64)
    both = (t > 0) & (o > 0)
    if not both.any():
        return 0
    pairs, inter = np.unique(np.stack([t[both], o[both]]), axis=1, return_counts=True)
    t_ids, t_area = np.unique(t[t > 0], return_counts=True)
    o_ids, o_area = np.unique(o[o > 0], return_counts=True)
    area_t = t_area[np.searchsorted(t_ids, pairs[0])]
    area_o = o_area[np.searchsorted(o_ids, pairs[1])]
    return int(np.count_nonzero(inter / (area_t + area_o - inter) > iou))


def instance_counts(truth: NDArray[np.integer], pred: NDArray[np.integer]) -> dict[str, int]:
    """Foreground and object counts of one image with an instance ground truth.

    Parameters
    ----------
    truth : ndarray of int, shape (H, W)
        Instance labels, 0 = background.
    pred : ndarray of int, shape (H, W)
        Predicted segments.

    Returns
    -------
    dict
        ``fg_intersection``, ``fg_union`` (pixels), ``objects_true``,
        ``objects_pred``, ``objects_matched`` (IoU > 0.5).
    """
    t = np.asarray(truth)
    p = np.asarray(pred)
    if t.shape != p.shape:
        raise ValueError(f"truth and pred must have the same shape, got {t.shape} and {p.shape}")
    truth_fg = t > 0
    fg_labels = foreground_segments(truth_fg, p)
    pred_fg = np.isin(p, fg_labels)
    objects = predicted_objects(p, fg_labels)
    return {
        "fg_intersection": int(np.count_nonzero(truth_fg & pred_fg)),
        "fg_union": int(np.count_nonzero(truth_fg | pred_fg)),
        "objects_true": int(np.unique(t[truth_fg]).size),
        "objects_pred": int(objects.max()),
        "objects_matched": matched_objects(t, objects),
    }


def instance_scores(counts: Iterable[dict[str, int]]) -> dict[str, float]:
    """Dataset instance scores from per-image :func:`instance_counts`.

    ``fg_iou`` and the object figures pool the counts of all images (micro
    average); ``fg_iou_mean`` and ``object_f1_mean`` average per-image values.
    """
    rows = list(counts)
    keys = (
        "fg_intersection",
        "fg_union",
        "objects_true",
        "objects_pred",
        "objects_matched",
    )
    total = {k: sum(r[k] for r in rows) for k in keys}

    def f1(r: dict[str, int]) -> float:
        denom = r["objects_true"] + r["objects_pred"]
        return 2 * r["objects_matched"] / denom if denom else float("nan")

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    per_iou = [ratio(r["fg_intersection"], r["fg_union"]) for r in rows]
    per_f1 = [f1(r) for r in rows]
    return {
        "fg_iou": ratio(total["fg_intersection"], total["fg_union"]),
        "fg_iou_mean": float(np.nanmean(per_iou))
        if rows and np.isfinite(per_iou).any()
        else float("nan"),
        "object_f1": f1(total),
        "object_f1_mean": float(np.nanmean(per_f1))
        if rows and np.isfinite(per_f1).any()
        else float("nan"),
        "object_precision": ratio(total["objects_matched"], total["objects_pred"]),
        "object_recall": ratio(total["objects_matched"], total["objects_true"]),
        **{k: float(v) for k, v in total.items()},
    }
