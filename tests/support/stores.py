"""Fixture result stores for the report tests, built in code (fixture data, not real results).

``write_tiny_store``: a handful of samples per cell whose every number the tests compute by hand.
``write_example_store``: a paper-sized layout (6 tasks x 5 methods x 3 budgets) with synthetic
per-sample answers, used for the example outputs in reports/example/ and the plot tests:

    python tests/support/stores.py reports/example
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from prunebench.results import Record, RecordKey, ResultStore

TINY_MODEL = "tiny-llava"
EXAMPLE_MODEL = "FIXTURE — not results (llava-1.5-7b layout)"  # in every title and plot of reports/example
FIXTURE_DEVICE = "fixture (synthetic numbers)"

# -- tiny store -------------------------------------------------------------------------------
GQA_TARGETS = ["cat", "dog", "red", "two", "yes", "no", "left", "tree", "car", "blue"]
GQA_OUTPUTS = {  # the unpruned model is right on the first 8
    ("none", "all"): ["cat", "dog", "red", "two", "yes", "no", "left", "tree", "bird", "green"],
    ("fastv", "64"): ["cat ", "dog", "red", "two", "yes", "no", "left", "bush", "bird", "green"],  # 7 right, 9 same
    ("random", "64"): ["cat", "dog", "red", "two", "yes", "no", "right", "bush", "bird", "red"],  # 6 right, 7 same
    ("fastv", "192"): ["cat", "dog", "red", "two", "yes", "no", "left", "tree", "bird", "yellow"],  # 8 right, 9 same
    ("random", "192"): ["cat", "dog", "red", "two", "yes", "no", "left", "tree", "bird", "green"],  # 8 right, 10 same
}
# MME: two categories x two images x (a "yes" and a "no" question); 1 = answered right
MME_RIGHT = {
    ("none", "all"): {"color": [[1, 1], [1, 1]], "count": [[1, 1], [1, 1]]},  # 200 + 200 = 400
    ("fastv", "64"): {"color": [[1, 1], [1, 0]], "count": [[0, 1], [0, 0]]},  # (200+50)/2 + (50+0)/2 = 150
    ("random", "64"): {"color": [[1, 1], [1, 1]], "count": [[1, 1], [1, 0]]},  # 200 + 125 = 325
    ("fastv", "192"): {"color": [[1, 1], [1, 1]], "count": [[1, 1], [1, 0]]},  # 325; random @192 has no MME
}
POPE_TARGETS = ["yes"] * 5 + ["no"] * 5
POPE_OUTPUTS = {
    ("none", "all"): POPE_TARGETS,  # F1 1
    ("fastv", "64"): ["yes"] * 4 + ["no", "yes"] + ["no"] * 4,  # tp 4 fp 1 fn 1: F1 0.8
    ("random", "64"): ["yes"] * 10,  # tp 5 fp 5: P 0.5 R 1, F1 2/3
    ("fastv", "192"): POPE_TARGETS,  # F1 1
    ("random", "192"): ["yes"] * 4 + ["no"] * 6,  # tp 4 fn 1: P 1 R 0.8, F1 8/9
}
# profile timings (ms) on the fixture device, and eval-record timings on "cpu"
TINY_PROFILE = {("none", "all"): (10.0, 0.0, 100.0, 110.0, 8.0), ("fastv", "64"): (10.0, 2.0, 40.0, 52.0, 3.0)}
TINY_EVAL_PREFILL = {"gqa": 30.0, "mme": 40.0, "pope": 20.0}  # random's (and the baseline's, x2) per-task prefill


def _record(
    model: str,
    method: str,
    budget: str,
    task: str,
    *,
    kind: str = "eval",
    metrics: dict | None = None,
    primary: str | None = None,
    n: int = 0,
    tokens: dict | None = None,
    timing: dict | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    limit: int | None = None,
    stage: str | None = None,
) -> Record:
    provenance: dict[str, Any] = {"device": device}
    if dtype:
        provenance["dtype"] = dtype
    return Record(
        key=RecordKey(model, method, budget, task, limit),
        kind=kind,
        metrics=metrics or {},
        primary_metric=primary,
        n_samples=n,
        visual_tokens=tokens or {},
        timing=timing or {},
        provenance=provenance,
        stage=stage or ("none" if method == "none" else "pre"),
    )


def _tiny_tokens(method: str, budget: str) -> dict[str, float]:
    if budget == "all":
        return {"nominal": None, "mean_kept": 576, "equivalent": 576, "original": 576}
    k = int(budget)
    equivalent = (2 * 576 + 6 * k) / 8 if method == "fastv" else k  # fastv prunes inside an 8-layer LLM at layer 2
    return {"nominal": k, "mean_kept": k, "equivalent": equivalent, "original": 576}


def _eval_timing(method: str, task: str) -> dict[str, float]:
    prefill = TINY_EVAL_PREFILL[task] * (2.0 if method == "none" else 1.0)
    return {"vision": 5.0, "pruner": 1.0 if method != "none" else 0.0, "prefill": prefill, "ttft": prefill + 6.0}


def write_tiny_store(root: Path) -> ResultStore:
    store = ResultStore(root)
    for (method, budget), outputs in GQA_OUTPUTS.items():
        samples = [
            {"doc_id": i, "output": out, "target": tgt, "scores": {"exact_match": float(out.strip() == tgt)}}
            for i, (out, tgt) in enumerate(zip(outputs, GQA_TARGETS))
        ]
        right = sum(s["scores"]["exact_match"] for s in samples)
        store.write(
            _record(
                TINY_MODEL,
                method,
                budget,
                "gqa",
                metrics={"exact_match": right / 10},
                primary="exact_match",
                n=10,
                tokens=_tiny_tokens(method, budget),
                timing=_eval_timing(method, "gqa"),
            ),
            samples,
        )
    for (method, budget), right in MME_RIGHT.items():
        samples, total = [], 0.0
        for category, pairs in right.items():
            pair_scores = []
            for image, pair in enumerate(pairs):
                for question, (ok, target) in enumerate(zip(pair, ("yes", "no"))):
                    wrong = "no" if target == "yes" else "yes"
                    samples.append(
                        {
                            "doc_id": f"{category}/{image}/{question}",
                            "category": category,
                            "question_id": f"{category}_{image}.jpg",
                            "output": "Yes" if (target if ok else wrong) == "yes" else "No",
                            "target": target.capitalize(),
                            "scores": {"mme_perception_score": float(ok)},
                        }
                    )
                pair_scores.append(100.0 * sum(pair) / 2 + 100.0 * (sum(pair) == 2))
            total += sum(pair_scores) / len(pair_scores)
        store.write(
            _record(
                TINY_MODEL,
                method,
                budget,
                "mme",
                metrics={"mme_perception_score": total, "mme_cognition_score": 300.0},
                primary="mme_perception_score",
                n=8,
                tokens=_tiny_tokens(method, budget),
                timing=_eval_timing(method, "mme"),
            ),
            samples,
        )
    for (method, budget), outputs in POPE_OUTPUTS.items():
        samples = [
            {"doc_id": 100 + i, "output": out, "target": tgt, "scores": {"pope_f1_score": float(out == tgt)}}
            for i, (out, tgt) in enumerate(zip(outputs, POPE_TARGETS))
        ]
        tp = sum(o == "yes" and t == "yes" for o, t in zip(outputs, POPE_TARGETS))
        precision, recall = tp / max(1, outputs.count("yes")), tp / 5
        f1 = 2 * precision * recall / (precision + recall)
        store.write(
            _record(
                TINY_MODEL,
                method,
                budget,
                "pope",
                metrics={"pope_f1_score": f1, "pope_accuracy": 0.5},
                primary="pope_accuracy",  # what the harness records: lmms-eval lists it first
                n=10,
                tokens=_tiny_tokens(method, budget),
                timing=_eval_timing(method, "pope"),
            ),
            samples,
        )
    for (method, budget), (vision, pruner, prefill, ttft, tflops) in TINY_PROFILE.items():
        timing = {"vision": vision, "pruner": pruner, "prefill": prefill, "ttft": ttft, "tflops": tflops}
        store.write(
            _record(
                TINY_MODEL,
                method,
                budget,
                "profile",
                kind="profile",
                n=30,
                timing=timing,
                tokens=_tiny_tokens(method, budget),
                device=FIXTURE_DEVICE,
                dtype="bf16",
            )
        )
    return store


# -- example store ----------------------------------------------------------------------------
# synthetic "paper-like" scores: (task, metric, unpruned accuracy in [0, 1], samples)
EXAMPLE_TASKS = [
    ("gqa", "exact_match", 0.62, 300),
    ("mmbench_en_dev_static", "gpt_eval_score", 0.65, 300),
    ("mme", "mme_perception_score", 0.8, 160),
    ("pope", "pope_f1_score", 0.86, 300),
    ("scienceqa_img", "exact_match", 0.70, 300),
    ("textvqa_val", "exact_match", 0.58, 300),
]
# accuracy kept relative to unpruned at K = 192 / 128 / 64, and the pruner's ms (fixture numbers)
EXAMPLE_METHODS = {
    "random": ((0.96, 0.93, 0.88), 0.05, "pre"),
    "fastv": ((0.90, 0.84, 0.74), 0.40, "llm"),
    "sparsevlm": ((0.96, 0.93, 0.86), 3.50, "llm"),
    "visionzip": ((0.985, 0.97, 0.94), 1.20, "pre"),
    "autoselect": ((0.99, 0.98, 0.965), 0.70, "pre"),
}
EXAMPLE_BUDGETS = ("192", "128", "64")
EXAMPLE_FLOORS = {"fastv": 0.45}  # in-LLM methods' floor controls: kept fraction with one token after layer 2


def _example_tokens(method: str, stage: str, k: int | str | None) -> dict[str, float]:
    if k is None:
        return {"nominal": None, "mean_kept": 576, "equivalent": 576, "original": 576}
    if k == "floor":
        return {"nominal": 1, "mean_kept": 1, "equivalent": round((2 * 576 + 30) / 32, 1), "original": 576}
    # an in-LLM method at layer 2 of 32 still shows all 576 tokens to the first two layers
    equivalent = (2 * 576 + 30 * k) / 32 if method == "fastv" else k  # SparseVLM schedules average to K
    return {"nominal": k, "mean_kept": k, "equivalent": round(equivalent, 1), "original": 576}


def _correct_vector(rng: np.random.Generator, base: np.ndarray, target: int, churn: float) -> np.ndarray:
    """A 0/1 vector with exactly ``target`` ones that differs from ``base`` in about ``churn`` of the places."""
    out = base.copy()
    ones, zeros = np.flatnonzero(base == 1), np.flatnonzero(base == 0)
    up = min(len(zeros), round(churn * len(base) * 0.3))
    down = up + int(base.sum()) - target
    if down > len(ones) or down < 0:
        up, down = max(0, target - int(base.sum())), max(0, int(base.sum()) - target)
    out[rng.choice(zeros, up, replace=False)] = 1
    out[rng.choice(ones, down, replace=False)] = 0
    return out


def _example_samples(task: str, metric: str, right: np.ndarray, base_right: np.ndarray, tag: str) -> list[dict]:
    samples = []
    for i, (ok, base_ok) in enumerate(zip(right, base_right)):
        if task == "pope":
            target = "yes" if i % 2 == 0 else "no"
            output = target if ok else ("no" if target == "yes" else "yes")
        elif task == "mme":
            target = "Yes" if i % 2 == 0 else "No"
            output = target if ok else ("No" if target == "Yes" else "Yes")
        else:
            target = f"answer-{i}"
            # a wrong answer changes when this run's correctness differs from the unpruned one's
            output = target if ok else (f"wrong-{i}" if not base_ok or tag == "none" else f"wrong-{i}-{tag}")
        sample: dict[str, Any] = {"doc_id": i, "output": output, "target": target}
        score = float(ok)
        if task == "textvqa_val" and ok:  # VQA accuracy: min(1, matching annotators / 3)
            score = (1.0, 2 / 3)[i % 5 == 0]
        if task == "mme":
            sample["category"] = ("existence", "count", "position", "color")[i // 40]
            sample["question_id"] = f"img{i // 2}"
        sample["scores"] = {metric: score}
        samples.append(sample)
    return samples


def _example_metric(task: str, samples: list[dict], metric: str) -> float:
    scores = np.array([s["scores"][metric] for s in samples])
    if task == "pope":
        pred = np.array([s["output"] == "yes" for s in samples])
        gold = np.array([s["target"] == "yes" for s in samples])
        tp = float((pred & gold).sum())
        precision, recall = tp / max(1, pred.sum()), tp / max(1, gold.sum())
        return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if task == "mme":
        total = 0.0
        for c in range(4):
            pairs = scores[c * 40 : (c + 1) * 40].reshape(20, 2)
            total += float((50.0 * pairs.sum(1) + 100.0 * (pairs.sum(1) == 2)).mean())
        return total
    return float(scores.mean()) * (100.0 if metric == "gpt_eval_score" else 1.0)


def write_example_store(root: Path) -> ResultStore:
    store = ResultStore(root)
    rng = np.random.default_rng(2024)
    runs = [("none", None, 1.0, 0.0, "none")] + [
        (m, k, kept[j], pruner, stage)
        for m, (kept, pruner, stage) in EXAMPLE_METHODS.items()
        for j, k in enumerate(EXAMPLE_BUDGETS)
    ] + [(m, "floor", kept, EXAMPLE_METHODS[m][1], "llm") for m, kept in EXAMPLE_FLOORS.items()]
    base_right: dict[str, np.ndarray] = {}
    for task, metric, accuracy, n in EXAMPLE_TASKS:
        base = np.zeros(n, dtype=int)
        base[rng.choice(n, round(accuracy * n), replace=False)] = 1
        base_right[task] = base
    for method, k, kept, pruner, stage in runs:
        budget = "all" if k is None else k
        tokens = _example_tokens(method, stage, k if k in (None, "floor") else int(k))
        for task, metric, _, n in EXAMPLE_TASKS:
            if (method, budget, task) == ("sparsevlm", "64", "textvqa_val"):
                continue  # a cell left missing on purpose: the table must show it as "–"
            base = base_right[task]
            right = (
                base
                if method == "none"
                else _correct_vector(rng, base, round(kept * base.sum() + rng.normal(0, 2)), 1.0 - kept + 0.05)
            )
            samples = _example_samples(task, metric, right, base, method)
            store.write(
                _record(
                    EXAMPLE_MODEL,
                    method,
                    budget,
                    task,
                    metrics={metric: _example_metric(task, samples, metric)},
                    primary=metric,
                    n=n,
                    tokens=tokens,
                    # prefill TFLOPs as the run records them: ~ the tokens each layer saw
                    timing={"tflops": round(8.89 * (tokens["equivalent"] + 64) / 640, 2)},
                    device=FIXTURE_DEVICE,
                    dtype="bf16",
                    stage=stage,
                ),
                samples,
            )
        # profile: prefill ~ tokens seen, a fixed text part; vision constant
        prefill = 118.66 * (tokens["equivalent"] + 64) / (576 + 64)
        timing = {
            "vision": 29.7,
            "pruner": pruner,
            "prefill": round(prefill, 2),
            "ttft": round(29.7 + pruner + prefill, 2),
            "tflops": round(8.89 * (tokens["equivalent"] + 64) / 640, 2),
        }
        store.write(
            _record(
                EXAMPLE_MODEL,
                method,
                budget,
                "profile",
                kind="profile",
                n=30,
                timing=timing,
                tokens=tokens,
                device=FIXTURE_DEVICE,
                dtype="bf16",
            )
        )
    return store


# -- parity store: LLaVA-1.5-7B cells whose paper-scale scores the reference tests compute by hand --
PARITY_MODEL = "llava-hf/llava-1.5-7b-hf"
PARITY_OPTIONS = {  # every option with its default, as the harness records them
    "none": {"positions": "reindex"},
    "fastv": {"layer": 2, "ratio": None, "positions": "original"},
    "sparsevlm": {"layers": [2, 6, 15], "version": "1.5", "recycle": None, "recycle_top": 0.3, "cluster_every": 10,
                  "heads": 14, "published": True, "positions": None},
    "pyramiddrop": {"layers": [8, 16, 24], "ratios": None, "positions": "reindex"},
    "random": {"seed": 0, "positions": "reindex"},
}
# POPE: per split, (targets, outputs); F1 by hand in the comments
PARITY_POPE = {
    ("none", "all"): {
        "adversarial": (["yes", "yes", "no", "no"], ["yes", "no", "no", "no"]),  # tp 1 fn 1: P 1, R 1/2, F1 2/3
        "popular": (["yes", "yes", "no", "no"], ["yes", "yes", "no", "no"]),  # F1 1
        "random": (["yes", "yes", "no", "no"], ["yes", "yes", "yes", "no"]),  # tp 2 fp 1: P 2/3, R 1, F1 4/5
    },  # mean 0.8222 -> 82.2; overall F1 (what lmms-eval records): tp 5, fp 1, fn 1 -> 0.8333
    ("fastv", "64"): {
        "adversarial": (["yes", "yes", "no", "no"], ["no", "no", "no", "no"]),  # no "yes": F1 0
        "popular": (["yes", "yes", "no", "no"], ["yes", "no", "no", "no"]),  # F1 2/3
        "random": (["yes", "yes", "no", "no"], ["yes", "yes", "no", "no"]),  # F1 1
    },  # mean 0.5556 -> 55.6
}
# MME: category -> per image (perception or cognition, [question right?, ...]); the unpruned run only
PARITY_MME = {
    "color": ("mme_perception_score", [[1, 1], [1, 1]]),  # 200
    "count": ("mme_perception_score", [[1, 1], [1, 0]]),  # (200 + 50) / 2 = 125 -> perception 325
    "code_reasoning": ("mme_cognition_score", [[1, 1], [1, 1]]),  # cognition 200 -> P + C = 525
}
# GQA: (samples, right)
PARITY_GQA = {("none", "all"): (20, 12), ("fastv", "64"): (40, 36), ("sparsevlm", "192"): (20, 11),
              ("sparsevlm:version=2.0", "192"): (20, 10), ("random", "64"): (20, 8)}


def _parity_record(method: str, budget: str, task: str, metrics: dict, n: int) -> Record:
    name = method.partition(":")[0]
    options = dict(PARITY_OPTIONS[name])
    if method == "sparsevlm:version=2.0":
        options["version"] = "2.0"
    if method.startswith("pyramiddrop:"):
        options["ratios"] = [0.5, 0.25, 0.125]
    tokens = {"nominal": None if budget == "all" else int(budget) if budget.isdigit() else None, "original": 576}
    return Record(key=RecordKey(PARITY_MODEL, method, budget, task), metrics=metrics, primary_metric=next(iter(metrics)),
                  n_samples=n, method_options=options, stage="none" if name == "none" else "llm",
                  visual_tokens=tokens, provenance={"device": FIXTURE_DEVICE, "dtype": "float16"})


def write_parity_store(root: Path) -> ResultStore:
    store = ResultStore(root)
    for (method, budget), (n, right) in PARITY_GQA.items():
        samples = [{"doc_id": i, "output": "a", "target": "a" if i < right else "b",
                    "scores": {"exact_match": float(i < right)}} for i in range(n)]
        store.write(_parity_record(method, budget, "gqa", {"exact_match": right / n}, n), samples)
    for (method, budget), splits in PARITY_POPE.items():
        samples = []
        for split, (targets, outputs) in splits.items():
            for target, output in zip(targets, outputs):
                samples.append({"doc_id": len(samples), "category": split, "output": output.capitalize(),
                                "target": target, "scores": {"pope_accuracy": float(output == target)}})
        pred = [s["output"].lower() == "yes" for s in samples]
        gold = [s["target"] == "yes" for s in samples]
        tp = sum(p and g for p, g in zip(pred, gold))
        f1 = 2 * tp / (sum(pred) + sum(gold))
        metrics = {"pope_f1_score": f1, "pope_accuracy": sum(p == g for p, g in zip(pred, gold)) / len(samples)}
        store.write(_parity_record(method, budget, "pope", metrics, len(samples)), samples)
    samples, totals = [], {"mme_perception_score": 0.0, "mme_cognition_score": 0.0}
    for category, (metric, images) in PARITY_MME.items():
        for image, questions in enumerate(images):
            for ok in questions:
                samples.append({"doc_id": len(samples), "category": category, "question_id": f"{category}/{image}.png",
                                "output": "Yes" if ok else "No", "target": "Yes", "scores": {metric: float(ok)}})
        totals[metric] += sum(50.0 * sum(q) + 100.0 * (sum(q) == 2) for q in images) / len(images)
    store.write(_parity_record("none", "all", "mme", totals, len(samples)), samples)
    pdrop = [dict(s) for s in samples if s["category"] != "count"]  # color 200 + cognition 200
    store.write(_parity_record("pyramiddrop:ratios=0.5/0.25/0.125", "all", "mme",
                               {"mme_perception_score": 200.0, "mme_cognition_score": 200.0}, len(pdrop)), pdrop)
    return store


if __name__ == "__main__":  # regenerate reports/example from the example fixture store
    import tempfile

    from prunebench.commands.main import main

    out = sys.argv[1] if len(sys.argv) > 1 else "reports/example"
    with tempfile.TemporaryDirectory() as tmp:
        write_example_store(Path(tmp) / "results")
        sys.exit(
            main(["report", "--results", str(Path(tmp) / "results"), "--out", out, "--compare", "autoselect", "random"])
        )
