"""Bias metrics over class frequencies (seed 0124) and the other protocols of the literature.

Inputs are per-image class labels of one attribute (or of an intersection, see `joint_labels`), with
``no_face`` (default -1) for images where no face was found. Frequencies are taken over the images
*with* a face; the face-less count is reported beside them (`ClassFrequencies.no_face`), never dropped
silently. With no face at all, the frequencies are NaN and so is every metric of them.

For K classes with frequencies f and a target t (uniform when not given):

- ``bias(f)          = mean over pairs i < j of |f_i - f_j|``       (seed 0124; assumes a uniform target)
- ``total_variation  = 1/2 sum_k |f_k - t_k|``
- ``kl_divergence    = sum_k f_k log(f_k / t_k)``                     (KL(freq || target), nats)
- ``fairness_discrepancy = ||f - t||_2``                               (the FD of fair generative modeling)
- ``binary_delta(p)  = |0.5 - p| / 0.5``                               (concept-editing papers; = bias for K=2)
"""
import itertools
from typing import Dict, Mapping, NamedTuple, Optional, Sequence

import numpy as np

# KL terms with f_k = 0 are 0 (the limit of x log x). A target class of probability 0 that does occur
# would give +inf; the target is floored at KL_EPSILON instead, so the value stays finite and large.
KL_EPSILON = 1e-12


class ClassFrequencies(NamedTuple):
    freqs: np.ndarray  # [K] float64, counts / (images with a face); NaN when there is none
    counts: np.ndarray  # [K] int64
    no_face: int  # images without a face (not in the denominator)

    @property
    def num_images(self) -> int:
        return int(self.counts.sum()) + self.no_face


def _labels_array(labels) -> np.ndarray:
    array = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"labels must be a 1-d sequence of ints, got shape {array.shape} dtype {array.dtype}")
    return array.astype(np.int64)


def class_frequencies(labels, num_classes: int, no_face: int = -1) -> ClassFrequencies:
    """Class frequencies among the images with a face; labels [num_images] ints in [0, K) or no_face."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = _labels_array(labels)
    has_face = labels != no_face
    bad = labels[has_face & ((labels < 0) | (labels >= num_classes))]
    if bad.size:
        raise ValueError(f"labels must be in [0, {num_classes}) or {no_face} (no face), got "
                         f"{sorted(set(bad.tolist()))}")
    counts = np.bincount(labels[has_face], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        freqs = counts / counts.sum()
    return ClassFrequencies(freqs, counts, int((~has_face).sum()))


def joint_labels(labels: Sequence, num_classes: Sequence[int], no_face: int = -1) -> np.ndarray:
    """Labels of the intersection (e.g. gender x race, K = 2 * 4): cell = row-major index over the
    attributes' classes; no_face where any attribute is no_face."""
    if len(labels) != len(num_classes):
        raise ValueError(f"{len(labels)} label arrays but {len(num_classes)} class counts")
    arrays = [_labels_array(array) for array in labels]
    if len({array.shape for array in arrays}) > 1:
        raise ValueError(f"label arrays differ in length: {[array.size for array in arrays]}")
    for index, (array, k) in enumerate(zip(arrays, num_classes)):  # else a bad label lands in another cell
        bad = array[(array != no_face) & ((array < 0) | (array >= k))]
        if bad.size:
            raise ValueError(f"labels[{index}] must be in [0, {k}) or {no_face} (no face), got "
                             f"{sorted(set(bad.tolist()))}")
    cell = np.zeros_like(arrays[0])
    for array, k in zip(arrays, num_classes):
        cell = cell * k + array
    return np.where(np.any([array == no_face for array in arrays], axis=0), no_face, cell)


def _distribution(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size < 1:
        raise ValueError(f"{name} must be a 1-d vector of class probabilities, got shape {array.shape}")
    return array


def _frequencies(values) -> np.ndarray:
    """freqs [K] checked: class frequencies (>= 0, summing to 1), or all NaN (no image had a face); counts or
    other numbers gave metrics out of their range (a total variation of 1.5) without an error."""
    if isinstance(values, ClassFrequencies):  # class_frequencies' whole result: its frequencies
        values = values.freqs
    freqs = _distribution(values, "freqs")
    if np.isnan(freqs).all():
        return freqs
    if not np.isfinite(freqs).all() or (freqs < 0).any() or abs(freqs.sum() - 1) > 1e-6:
        raise ValueError(f"freqs must be class frequencies >= 0 summing to 1 (class_frequencies(...).freqs, not its "
                         f"counts), or all NaN, got {freqs.tolist()}")
    return freqs


def _freqs_and_target(freqs, target):
    freqs = _frequencies(freqs)
    if target is None:
        return freqs, np.full_like(freqs, 1.0 / freqs.size)
    target = _distribution(target, "target")
    if target.shape != freqs.shape:
        raise ValueError(f"target has {target.size} classes, freqs {freqs.size}")
    if not np.isfinite(target).all() or (target < 0).any() or abs(target.sum() - 1) > 1e-6:
        raise ValueError(f"target must be probabilities >= 0 summing to 1, got {target.tolist()}")
    return freqs, target


def bias(freqs) -> float:
    """Seed 0124: mean over the K(K-1)/2 class pairs of |freq(i) - freq(j)|."""
    freqs = _frequencies(freqs)
    if freqs.size < 2:
        raise ValueError("bias needs at least 2 classes")
    return float(np.mean([abs(a - b) for a, b in itertools.combinations(freqs, 2)]))


def total_variation(freqs, target=None) -> float:
    freqs, target = _freqs_and_target(freqs, target)
    return float(0.5 * np.abs(freqs - target).sum())


def kl_divergence(freqs, target=None) -> float:
    """KL(freqs || target) in nats; empty classes contribute 0, the target is floored at KL_EPSILON."""
    freqs, target = _freqs_and_target(freqs, target)
    if np.isnan(freqs).any():
        return float("nan")
    present = freqs > 0
    return float((freqs[present] * np.log(freqs[present] / np.maximum(target[present], KL_EPSILON))).sum())


def fairness_discrepancy(freqs, target=None) -> float:
    freqs, target = _freqs_and_target(freqs, target)
    return float(np.linalg.norm(freqs - target))


def binary_delta(p: float) -> float:
    """|0.5 - p| / 0.5 for the frequency p of one of two classes (e.g. female), p in [0, 1] (NaN: no face)."""
    p = float(p)
    if not (0 <= p <= 1 or np.isnan(p)):
        raise ValueError(f"binary_delta: p={p} is not a frequency in [0, 1]")
    return abs(0.5 - p) / 0.5


def frequency_metrics(labels, num_classes: int, target=None, no_face: int = -1) -> Dict[str, object]:
    """Every metric of one prompt's labels, plus its frequencies and face-less count."""
    stats = class_frequencies(labels, num_classes, no_face)
    metrics = {"bias": bias(stats.freqs),
               "total_variation": total_variation(stats.freqs, target),
               "kl": kl_divergence(stats.freqs, target),
               "fairness_discrepancy": fairness_discrepancy(stats.freqs, target)}
    return {**metrics, "freqs": stats.freqs.tolist(), "no_face": stats.no_face, "num_images": stats.num_images}


def per_prompt_metrics(labels_by_prompt: Mapping[str, object], num_classes: int, target=None,
                       no_face: int = -1) -> Dict[str, Dict[str, object]]:
    """`frequency_metrics` for each prompt: {prompt: metrics}."""
    return {prompt: frequency_metrics(labels, num_classes, target, no_face)
            for prompt, labels in labels_by_prompt.items()}


def mean_std(values, ddof: int = 0) -> Dict[str, float]:
    """Mean and standard deviation (population, ddof=0, unless told) over prompts, NaNs skipped."""
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "count": 0}
    std = float(np.std(array, ddof=ddof)) if array.size > ddof else float("nan")
    return {"mean": float(array.mean()), "std": std, "count": int(array.size)}


def summarize(per_prompt: Mapping[str, Mapping[str, object]], ddof: int = 0,
              keys: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """{metric: mean_std over prompts} for the float metrics of per-prompt rows {prompt: {metric: value}}
    (`per_prompt_metrics`' output, or the evaluation's `Scorer.score_prompt` rows); face-less counts, `no_face`
    and each attribute set's `<set>.no_face`, are summed instead: {"total": int}."""
    rows = list(per_prompt.values())
    if keys is None:
        keys = [key for key, value in rows[0].items() if isinstance(value, (float, np.floating))] if rows else []
    summary = {key: mean_std([row[key] for row in rows], ddof) for key in keys}
    counted = ["no_face"] + [key for key in (rows[0] if rows else ()) if key.endswith(".no_face")]
    summary.update({key: {"total": int(sum(row.get(key, 0) for row in rows))} for key in counted})
    return summary
