"""Statistics behind the report's numbers: bootstrap intervals, agreement, paired tests.

A record's per-sample JSONL (``{"doc_id", "output", "target", "scores": {metric: float}}``) is
turned into resampling *units* from which the task's score is rebuilt exactly as lmms-eval
aggregates it:

- ``mean`` metrics (exact_match, VQA accuracy, seed_*, mmmu_acc, pope_accuracy, MMBench's
  gpt_eval_score): the mean of the per-sample score; a unit is a sample.
- ``pope_f1_score``: F1 of the "yes" class, rebuilt from each sample's output and target.
- MME (``mme_perception_score`` / ``mme_cognition_score``): the sum over categories of the mean
  per image of acc + acc+ (both questions right); a unit is an image's question pair, resampled
  within its category (a stratified bootstrap, so every category stays in every replicate).
  Needs ``category`` and ``question_id`` on each sample.

Intervals are percentile bootstraps. The paired test against another run on the same samples is
McNemar's exact test when both runs score every unit 0/1 and the metric is their mean (the
standard test for paired binary outcomes; exact because the discordant counts are often small),
and otherwise a paired bootstrap of the score difference (VQA accuracy is not binary, F1 and MME
are not means), whose two-sided p-value is twice the share of replicates on the far side of zero
(counted as (k + 1) / (B + 1), so it is never below 2 / (B + 1)).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np

from prunebench.errors import UserError

# bootstrap replicates are drawn in chunks so that one chunk's index array stays this small
_CHUNK_ELEMENTS = 4_000_000


class StatsError(UserError, ValueError):
    """Per-sample data that cannot rebuild the task's score."""


@dataclass(frozen=True)
class MetricInfo:
    kind: str  # "mean", "pope_f1" or "mme": how the score is rebuilt from samples
    fraction: bool  # the native value lies in [0, 1] (the report shows it x100)
    factor: float = 1.0  # native value = factor * mean of per-sample scores ("mean" kind)


METRICS: dict[str, MetricInfo] = {
    "exact_match": MetricInfo("mean", True),
    "pope_accuracy": MetricInfo("mean", True),
    "pope_f1_score": MetricInfo("pope_f1", True),
    "mme_perception_score": MetricInfo("mme", False),
    "mme_cognition_score": MetricInfo("mme", False),
    "gpt_eval_score": MetricInfo("mean", False, 100.0),  # lmms-eval returns MMBench accuracy x100
    "seed_image": MetricInfo("mean", True),
    "seed_video": MetricInfo("mean", True),
    "seed_all": MetricInfo("mean", True),
    "mmmu_acc": MetricInfo("mean", True),
}


def metric_info(metric: str) -> MetricInfo:
    """What is known about a metric; an unknown one is assumed to be a plain mean, shown as is."""
    return METRICS.get(metric, MetricInfo("mean", False))


@dataclass(frozen=True)
class Units:
    """One run's samples as resampling units, in a fixed order."""

    metric: str
    keys: tuple[Hashable, ...]  # the join key for paired statistics (doc_id, or MME's (category, id))
    values: np.ndarray  # (n, c) per-unit columns, see ``statistic``
    strata: np.ndarray  # (n,) stratum label per unit; resampling never crosses strata

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, positions: Sequence[int]) -> Units:
        pos = np.asarray(positions, dtype=np.intp)
        return replace(self, keys=tuple(self.keys[i] for i in pos), values=self.values[pos], strata=self.strata[pos])

    def statistic(self, idx: np.ndarray) -> np.ndarray:
        """The score on the native scale for each row of unit indices ``idx`` (shape (..., n))."""
        info = metric_info(self.metric)
        v = self.values[idx]  # (..., n, c)
        if info.kind == "mean":
            return info.factor * v[..., 0].mean(-1)
        if info.kind == "pope_f1":
            pred, gold = v[..., 0] > 0.5, v[..., 1] > 0.5
            tp = (pred & gold).sum(-1)
            precision = _ratio(tp, pred.sum(-1))
            recall = _ratio(tp, gold.sum(-1))
            return _ratio(2 * precision * recall, precision + recall)
        # mme: column positions never change stratum (see ``resample``), so a mask selects a category
        return sum(v[..., self.strata == s, 0].mean(-1) for s in np.unique(self.strata))

    def value(self) -> float:
        """The score on all units."""
        return float(self.statistic(np.arange(len(self))))

    def is_binary(self) -> bool:
        return bool(np.isin(self.values[:, 0], (0.0, 1.0)).all())


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (lmms-eval's convention for precision, recall and F1)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def units_from_samples(samples: Sequence[dict[str, Any]], metric: str, where: str = "record") -> Units:
    """Build the resampling units of ``metric`` from one record's samples (``where`` names it in errors)."""
    kind = metric_info(metric).kind
    if kind == "mme":
        return _mme_units(samples, metric, where)
    keys, rows = [], []
    for sample in samples:
        if "doc_id" not in sample:
            raise StatsError(f"{where}: a sample has no doc_id")
        keys.append(sample["doc_id"])
        if kind == "pope_f1":
            rows.append((_is_yes(sample.get("output")), _is_yes(sample.get("target"))))
        else:
            scores = sample.get("scores") or {}
            if metric not in scores:
                raise StatsError(
                    f"{where}: sample {sample['doc_id']!r} has no per-sample score for {metric!r} "
                    f"(it has: {', '.join(scores) or 'none'})"
                )
            rows.append((float(scores[metric]),))
    _check_unique(keys, where)
    width = 2 if kind == "pope_f1" else 1
    return Units(metric, tuple(keys), np.asarray(rows, dtype=float).reshape(-1, width), np.zeros(len(keys), dtype=str))


def _is_yes(text: Any) -> float:
    # lmms-eval's POPE scoring: the lower-cased, stripped answer compared with "yes"
    return float(str(text or "").lower().strip() == "yes")


def _mme_units(samples: Sequence[dict[str, Any]], metric: str, where: str) -> Units:
    pairs: dict[tuple[str, Hashable], list[float]] = defaultdict(list)
    for sample in samples:
        scores = sample.get("scores") or {}
        if metric not in scores:  # lmms-eval routes each category to perception or cognition
            continue
        if "category" not in sample or "question_id" not in sample:
            raise StatsError(
                f"{where}: MME samples need 'category' and 'question_id' to rebuild {metric} "
                f"(acc + acc+ per image pair); sample {sample.get('doc_id')!r} lacks them"
            )
        pairs[(str(sample["category"]), sample["question_id"])].append(float(scores[metric]))
    bad = [key for key, s in pairs.items() if len(s) != 2]
    if bad:
        raise StatsError(f"{where}: MME needs both questions of each image; {len(bad)} incomplete, e.g. {bad[0]}")
    keys = sorted(pairs, key=repr)
    # per pair: acc (% of its two questions right) + acc+ (100 when both are right)
    values = np.array([[50.0 * sum(pairs[k]) + 100.0 * (sum(pairs[k]) == 2)] for k in keys]).reshape(-1, 1)
    return Units(metric, tuple(keys), values, np.array([k[0] for k in keys], dtype=str))


def _check_unique(keys: list[Hashable], where: str) -> None:
    if len(set(keys)) != len(keys):
        seen: set[Hashable] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise StatsError(f"{where}: doc_id {dup!r} appears more than once")


# -- bootstrap -------------------------------------------------------------------------------


def resample(rng: np.random.Generator, strata: np.ndarray, n_boot: int) -> np.ndarray:
    """(n_boot, n) unit indices drawn with replacement within each stratum (sorted stratum order).

    Column j always holds a unit of stratum ``strata[j]``; with one stratum this is
    ``rng.integers(0, n, (n_boot, n))``.
    """
    idx = np.empty((n_boot, strata.size), dtype=np.intp)
    for s in np.unique(strata):
        cols = np.flatnonzero(strata == s)
        idx[:, cols] = cols[rng.integers(0, cols.size, size=(n_boot, cols.size))]
    return idx


def _replicates(
    statistics: Sequence[Callable[[np.ndarray], np.ndarray]], strata: np.ndarray, n_boot: int, seed: int
) -> list[np.ndarray]:
    """Bootstrap replicates of each statistic, all on the same resampled indices."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(1, strata.size))
    chunks: list[list[np.ndarray]] = [[] for _ in statistics]
    for start in range(0, n_boot, rows):
        idx = resample(rng, strata, min(rows, n_boot - start))
        for out, stat in zip(chunks, statistics):
            out.append(stat(idx))
    return [np.concatenate(c) for c in chunks]


def bootstrap_replicates(units: Units, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap replicates of the score (native scale)."""
    if len(units) == 0:
        raise StatsError("no samples to bootstrap")
    (reps,) = _replicates([units.statistic], units.strata, n_boot, seed)
    return reps


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_interval(units: Units, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the score (native scale)."""
    return percentile_interval(bootstrap_replicates(units, n_boot, seed), level)


# -- paired comparisons -----------------------------------------------------------------------


def align(a: Units, b: Units) -> tuple[Units, Units]:
    """The units both runs share, in ``a``'s order."""
    where_b = {k: i for i, k in enumerate(b.keys)}
    pairs = [(i, where_b[k]) for i, k in enumerate(a.keys) if k in where_b]
    return a.take([i for i, _ in pairs]), b.take([j for _, j in pairs])


@dataclass(frozen=True)
class PairedResult:
    n: int  # units both runs share
    difference: float  # score(a) - score(b) on the shared units, native scale
    test: str  # "McNemar exact" or "paired bootstrap"
    p_value: float
    discordant: tuple[int, int] | None = None  # McNemar's (a right & b wrong, a wrong & b right)


def paired_test(a: Units, b: Units, n_boot: int = 2000, seed: int = 0) -> PairedResult:
    """Is ``a``'s score different from ``b``'s on the samples both answered?"""
    if a.metric != b.metric:
        raise StatsError(f"cannot pair {a.metric!r} with {b.metric!r}")
    a, b = align(a, b)
    if len(a) == 0:
        raise StatsError("the two runs share no samples")
    difference = a.value() - b.value()
    if metric_info(a.metric).kind == "mean" and a.is_binary() and b.is_binary():
        ra, rb = a.values[:, 0] == 1.0, b.values[:, 0] == 1.0
        only_a, only_b = int((ra & ~rb).sum()), int((~ra & rb).sum())
        return PairedResult(len(a), difference, "McNemar exact", mcnemar_exact(only_a, only_b), (only_a, only_b))
    rep_a, rep_b = _replicates([a.statistic, b.statistic], a.strata, n_boot, seed)
    d = rep_a - rep_b
    # (k + 1) / (B + 1): a bootstrap p-value never claims more resolution than its B replicates give
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    p = min(1.0, 2.0 * (tail + 1) / (n_boot + 1))
    return PairedResult(len(a), difference, "paired bootstrap", p)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: twice the Binomial(b + c, 1/2) tail at min(b, c), capped at 1."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0); exact integers, so large n loses no precision
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def agreement(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(samples both runs answered, of which the answer text is unchanged after stripping whitespace)."""
    answers = {s["doc_id"]: str(s.get("output") or "").strip() for s in b}
    shared = [s for s in a if s["doc_id"] in answers]
    same = sum(str(s.get("output") or "").strip() == answers[s["doc_id"]] for s in shared)
    return len(shared), same
