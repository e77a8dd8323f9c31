"""What pruning costs: ``python -m benchmarks.method_overhead``.

1. Each method's pruner time (the engine's StageClock ``pruner`` stage) and the LLM prefill
   time, median over repeats, one image of N visual tokens, for each budget K.
2. FastV on our engine (SDPA layers, one attention row recomputed from q/k) against the same
   model run the official way: eager attention everywhere, layer K-1's attention maps taken
   from its forward (what ``output_attentions`` returns), pruning before layer K, then the rest.
3. DivPrune vectorised against the loops it replaces: the official shape (per image, each pick
   re-reduces over every picked row) and a plain Python loop over the tokens.
4. CDPruner's greedy DPP MAP, batched over images with incremental Cholesky rows, against a plain
   Python loop over the tokens, for one image and for a batch of eight.

Timings use one clock (perf_counter on CPU, CUDA events on a GPU) around the same code paths.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.markdown import Markdown
from transformers import DynamicCache

from prunebench.budget import Budget, BudgetError
from prunebench.engine.generate import PruningEngine
from prunebench.engine.method import (
    MethodError,
    available_methods,
    create_method,
    parse_method_list,
)
from prunebench.methods.cdpruner import EXHAUSTED, conditional_dpp
from prunebench.methods.divprune import cosine_distance, max_min_diverse
from prunebench.models.loading import load_model
from prunebench.profiling.profiler import DTYPES, device_name, synthetic_batch
from prunebench.training.selectors import CheckpointError
from prunebench.engine.timing import StageClock

FASTV_TARGET = 0.7  # issue 4: our FastV prefill must take <= 0.7x the official eager prefill


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:mid-llava", help="model name (default: random:mid-llava)")
    parser.add_argument("--budgets", default="192,128,64", help="comma-separated K values (default: 192,128,64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per cell; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each cell")
    parser.add_argument("--methods", default=None,
                        help="method specs (default: every registered method except test-*; learned ones "
                             "are listed as skipped unless given here with ckpt=DIR)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens around the image (default: 64)")
    parser.add_argument("--parts", default="overhead,fastv,divprune,cdpruner",
                        help="which measurements to run: overhead, fastv, divprune, cdpruner (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="reports/method_overhead_cpu.md", help="Markdown report path")
    parser.add_argument("--append", action="store_true",
                        help="add this run (with its own command line) to the end of --out instead of replacing it")


def main(args: argparse.Namespace) -> int:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"overhead", "fastv", "divprune", "cdpruner"})
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; valid choices: overhead, fastv, divprune, cdpruner")
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: need at least 1")
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--budgets {args.budgets!r}: give token counts separated by commas, e.g. 192,128,64") from None
    if args.dtype not in DTYPES:
        raise SystemExit(f"--dtype {args.dtype}: valid choices: {', '.join(DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = PruningEngine(model, processor.tokenizer)
    inputs = synthetic_batch(model.config, 1, args.prompt_tokens, engine.device, DTYPES[args.dtype])
    n_visual = int((inputs["input_ids"] == engine.adapter.image_token_id).sum())
    bench = Bench(engine, inputs, args.repeats, args.warmup)

    sections = [_header(args, engine.device, n_visual, inputs["input_ids"].shape[1])]
    if "overhead" in parts:
        explicit = args.methods is not None
        specs = parse_method_list(args.methods) if explicit else [
            name for name in available_methods() if not name.startswith("test-")
        ]
        console.print(f"[bold]pruner overhead[/]: {', '.join(specs)} x K={budgets}")
        sections.append(overhead_section(bench, specs, budgets, skip_untrained=not explicit))
    if "fastv" in parts:
        console.print("[bold]FastV: engine (SDPA) vs official eager[/]")
        sections.append(fastv_section(bench, budgets))
    if "divprune" in parts:
        console.print("[bold]DivPrune: vectorised vs loops[/]")
        sections.append(divprune_section(bench, budgets))
    if "cdpruner" in parts:
        console.print("[bold]CDPruner: batched DPP vs a plain loop[/]")
        sections.append(cdpruner_section(bench, budgets))

    text = "\n\n".join(sections) + "\n"
    console.print(Markdown(text))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        text = out.read_text() + "\n" + text.replace("# Method overhead", "# Method overhead: a further run", 1)
    out.write_text(text)
    console.print(f"written: {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# timing


class Bench:
    """One prompt + image on one engine; runs a callable with warm-up and reports medians."""

    def __init__(self, engine: PruningEngine, inputs: dict, repeats: int, warmup: int):
        self.engine, self.inputs, self.repeats, self.warmup = engine, inputs, repeats, warmup

    def runs(self, fn: Callable[[StageClock], object]) -> list[dict[str, float]]:
        """ms per stage of each timed repeat, after the warm-up runs."""
        for _ in range(self.warmup):
            fn(StageClock(self.engine.device))
        runs = []
        for _ in range(self.repeats):
            clock = StageClock(self.engine.device)
            fn(clock)
            runs.append(clock.summary())
        return runs

    def median(self, fn: Callable[[StageClock], object], stages: tuple[str, ...]) -> dict[str, float]:
        """Median ms of the sum of ``stages`` per run, and of each stage, over the timed repeats."""
        runs = self.runs(fn)
        out = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in {k for r in runs for k in r}}
        out["total"] = statistics.median(totals(runs, stages))
        return out

    @torch.inference_mode()
    def prefill(self, method, budget: Budget | str | int, clock: StageClock):
        x = self.inputs
        return self.engine.prefill(x["input_ids"], x["attention_mask"], x["pixel_values"], method,
                                   Budget.parse(budget), clock)


# ---------------------------------------------------------------------------------------------
# 1. pruner overhead per method and budget


def overhead_section(bench: Bench, specs: list[str], budgets: list[int], skip_untrained: bool) -> str:
    rows, skipped = [], []
    for spec in specs:
        try:
            method = create_method(spec)
        except CheckpointError as err:
            if not skip_untrained:
                raise
            skipped.append(f"- {spec}: {err}")
            continue
        cells = ["all"] if method.stage == "none" else budgets
        for k in cells:
            state = {}

            def once(clock, method=method, k=k, state=state):
                state["prefill"] = bench.prefill(method, k, clock)

            try:
                t = bench.median(once, ("pruner",))
            except (BudgetError, MethodError) as err:  # e.g. stage layers this model lacks: reported below
                skipped.append(f"- {method.spec()} at K={k}: {err}")
                continue
            tokens = state["prefill"].visual_tokens.float().mean().item()
            rows.append([method.spec(), str(k), f"{t.get('pruner', 0.0):.2f}", f"{t['prefill']:.1f}",
                         f"{t['vision']:.1f}", f"{tokens:.1f}"])
    table = markdown_table(["method", "K", "pruner ms", "LLM prefill ms", "vision ms", "visual tokens (layer avg)"], rows)
    notes = "\n\nNot measured:\n\n" + "\n".join(skipped) if skipped else ""
    return (
        "## Pruner overhead (median ms)\n\n" + table + "\n\nThe engine's StageClock: pruner = the method's "
        "signals, select() and the token gather at each of its stages; LLM prefill = decoder layers, norm "
        "and lm_head; vision = vision tower + projector." + notes
    )


# ---------------------------------------------------------------------------------------------
# 2. FastV: engine vs the official eager way


def fastv_section(bench: Bench, budgets: list[int], spec: str = "fastv") -> str:
    """``spec``: a method with FastV's rule and a ``layer`` field (the stage layer K)."""
    title = "## FastV: engine (SDPA + one recomputed attention row) vs official eager\n\n"
    if spec.partition(":")[0] not in available_methods():
        return title + f"skipped: no method named {spec!r} is registered (methods/fastv.py is not built yet)."
    rows = []
    for k in budgets:
        pair = compare_fastv(bench, spec, k)
        ours, eager = statistics.median(pair.ours), statistics.median(pair.eager)
        ratio = ours / eager
        rows.append([pair.spec, str(k), f"{eager:.1f}", f"{ours:.1f}", f"{ratio:.2f}",
                     "yes" if ratio <= FASTV_TARGET else "no", "yes" if pair.same_kept else "NO",
                     "yes" if pair.same_logits else "NO"])
    return title + markdown_table(
        ["method", "K", "official eager prefill ms", "engine prefill ms", "ratio", f"<= {FASTV_TARGET}",
         "same kept set", "same logits"], rows
    ) + "\n\n" + FASTV_NOTE


FASTV_NOTE = (
    "Prefill = decoder layers + pruning + lm_head for one prompt (vision tower excluded in both). "
    "Official way: the model switched to eager attention, layers run in order with a KV cache, layer "
    "K-1's attention maps taken from its forward, the last token's row averaged over heads ranks the "
    "image tokens, the top K keep their original positions, layers K.. run on the rest."
)


@dataclass
class FastVPair:
    spec: str
    ours: list[float]  # ms per timed repeat: pruner + prefill on the engine
    eager: list[float]  # ms per timed repeat: prefill the official way
    same_kept: bool
    same_logits: bool


def compare_fastv(bench: Bench, spec: str, k: int) -> FastVPair:
    """FastV at budget ``k`` on the engine and the official eager way (LLaVA-1.5 layouts: one image,
    1-D positions), timed alike, with whether both keep the same tokens and give the same logits."""
    model = bench.engine.model
    method = create_method(spec)
    state = {}

    def ours(clock):
        state["ours"] = bench.prefill(method, k, clock)

    ours_runs = totals(bench.runs(ours), ("pruner", "prefill"))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        def official(clock):
            state["official"] = fastv_eager_prefill(bench, method.layer, k, method.positions, clock)

        eager_runs = totals(bench.runs(official), ("prefill",))
    finally:
        model.set_attn_implementation(previous)
    layout = state["ours"].layout
    kept_ours = sorted(layout.visual_id[0][layout.visual_id[0] >= 0].tolist())
    kept_eager, logits_eager = state["official"]
    close = torch.allclose(state["ours"].logits.float(), logits_eager.float(), atol=1e-3, rtol=1e-3)
    return FastVPair(method.spec(), ours_runs, eager_runs, kept_ours == kept_eager, close)


@torch.inference_mode()
def fastv_eager_prefill(bench: Bench, layer: int, k: int, positions_policy: str, clock: StageClock):
    """FastV the official way on a model whose attention is eager. Returns (kept patch ids, logits)."""
    adapter, x = bench.engine.adapter, bench.inputs
    ids = x["input_ids"]
    vision = adapter.encode_images(x["pixel_values"])
    hidden = adapter.embed(ids)
    image = ids[0] == adapter.image_token_id
    hidden = hidden.masked_scatter(image[None, :, None], adapter.project(vision.features).to(hidden.dtype))
    maps = []
    hook = adapter.layers[layer - 1].self_attn.register_forward_hook(lambda _m, _i, out: maps.append(out[1]))
    cache = DynamicCache(config=adapter.decoder.config)
    try:
        with clock("prefill"):
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            slots = image.nonzero().flatten()
            kept = torch.arange(len(slots), device=hidden.device)
            for index, block in enumerate(adapter.layers):
                if index == layer:
                    scores = maps[-1][0, :, -1, slots].float().mean(0)
                    kept = scores.topk(k).indices.sort().values
                    keep = ~image.clone()
                    keep[slots[kept]] = True
                    hidden, positions = hidden[:, keep], positions[keep]
                    if positions_policy == "reindex":
                        positions = torch.arange(hidden.shape[1], device=hidden.device)
                seq = hidden.shape[1]
                mask = torch.full((seq, seq), torch.finfo(hidden.dtype).min, device=hidden.device,
                                  dtype=hidden.dtype).triu(1)[None, None]
                hidden = block(hidden, attention_mask=mask, position_ids=positions[None],
                               position_embeddings=adapter.decoder.rotary_emb(hidden, positions[None]),
                               use_cache=True, **{bench.engine.cache_argument: cache})
            logits = adapter.lm_head(adapter.decoder.norm(hidden[:, -1:]))[:, -1]
    finally:
        hook.remove()
    return kept.tolist(), logits


# ---------------------------------------------------------------------------------------------
# 3. DivPrune: vectorised vs loops


def divprune_section(bench: Bench, budgets: list[int]) -> str:
    features = projected_features(bench)
    rows = []
    for k in budgets:
        runs, same = time_divprune(bench, features, k)
        times = {name: statistics.median(values) for name, values in runs.items()}
        rows.append([str(k), f"{times['vectorised']:.2f}", f"{times['official']:.2f}", f"{times['python']:.1f}",
                     f"{times['vectorised'] / times['official']:.3f}", f"{times['vectorised'] / times['python']:.4f}",
                     "yes" if same else "NO"])
    n, width = features.shape[1:]
    return f"## DivPrune selection: N={n} tokens of width {width}, one image (median ms)\n\n" + markdown_table(
        ["K", "vectorised ms", "official-shape loop ms", "plain Python loop ms", "ratio vs official-shape",
         "ratio vs plain Python", "same picks"], rows
    ) + "\n\n" + DIVPRUNE_NOTE


DIVPRUNE_NOTE = (
    "All three include the cosine-distance matrix. Official shape: one Python step per pick that "
    "re-reduces the min over every picked row, one image at a time (as vbdi/divprune does). Plain "
    "Python: a loop over the tokens on Python floats, keeping a running min per token."
)


@torch.inference_mode()
def projected_features(bench: Bench) -> torch.Tensor:
    """The prompt's image tokens after the projector, ``(1, N, D)``: what DivPrune selects among."""
    engine, x = bench.engine, bench.inputs
    return engine.encode_images(x["pixel_values"], image_inputs=engine.adapter.image_inputs(x)).embeds


def time_divprune(bench: Bench, features: torch.Tensor, k: int) -> tuple[dict[str, list[float]], bool]:
    """ms per timed repeat of each DivPrune variant at ``k``, and whether all three pick the same tokens."""
    variants = {
        "vectorised": lambda: max_min_diverse(features, k)[0],
        "official": lambda: official_shape_loop(features[0], k),
        "python": lambda: plain_python_loop(features[0], k),
    }
    runs, picks = {}, {}
    for name, fn in variants.items():
        def once(clock, fn=fn, name=name):
            with clock("select"):
                out = fn()
            picks[name] = sorted(int(i) for i in out)

        runs[name] = totals(bench.runs(once), ("select",))
    return runs, picks["vectorised"] == picks["official"] == picks["python"]


@torch.inference_mode()
def official_shape_loop(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune shaped like the official selection: each pick reduces over all picked rows again."""
    dist = cosine_distance(features[None])[0]
    picks = torch.empty(k, dtype=torch.long, device=dist.device)
    for i in range(k):
        if i == 0:
            score = dist.topk(2, dim=0, largest=False).values[1]
        else:
            score = dist.index_select(0, picks[:i]).min(0).values
        picks[i] = score.argmax()
    return picks


@torch.inference_mode()
def plain_python_loop(features: torch.Tensor, k: int) -> list[int]:
    """DivPrune as a plain Python greedy loop over the tokens (distances as Python floats)."""
    dist = cosine_distance(features[None])[0].tolist()
    n = len(dist)
    columns = list(zip(*dist))
    first = [sorted(col)[1] for col in columns]
    picks = [max(range(n), key=first.__getitem__)]
    nearest = list(dist[picks[0]])
    chosen = {picks[0]}
    while len(picks) < k:
        best, best_score = -1, float("-inf")
        for j in range(n):
            if j not in chosen and nearest[j] > best_score:
                best, best_score = j, nearest[j]
        picks.append(best)
        chosen.add(best)
        row = dist[best]
        nearest = [min(a, b) for a, b in zip(nearest, row)]
    return picks


# ---------------------------------------------------------------------------------------------
# 4. CDPruner: batched greedy DPP vs a plain loop


def cdpruner_section(bench: Bench, budgets: list[int], batch: int = 8) -> str:
    adapter = bench.engine.adapter
    with torch.inference_mode():
        features = adapter.project(adapter.encode_images(bench.inputs["pixel_values"]).features)
    generator = torch.Generator().manual_seed(0)  # the selection's cost does not depend on the relevance values
    many = features.expand(batch, -1, -1) + 0.01 * torch.randn(batch, *features.shape[1:], generator=generator).to(features)
    relevance = torch.rand(batch, features.shape[1], generator=generator).to(features.device)
    mask = torch.ones_like(relevance, dtype=torch.bool)

    def batched(k: int, b: int) -> list[list[int]]:
        return conditional_dpp(many[:b], relevance[:b], mask[:b], k).tolist()

    def loop(k: int, b: int) -> list[list[int]]:
        return [plain_python_dpp(many[i], relevance[i], k) for i in range(b)]

    rows = []
    for k in budgets:
        times, picks = {}, {}
        for name, fn, b in (("one", batched, 1), ("many", batched, batch), ("loop", loop, 1)):
            def once(clock, fn=fn, name=name, k=k, b=b, picks=picks):
                with clock("select"):
                    picks[name] = [sorted(p) for p in fn(k, b)]

            times[name] = bench.median(once, ("select",))["total"]
        same = picks["one"] == picks["loop"] == picks["many"][:1]
        rows.append([str(k), f"{times['one']:.2f}", f"{times['many']:.2f}", f"{times['many'] / batch:.2f}",
                     f"{times['loop']:.1f}", f"{times['one'] / times['loop']:.4f}", "yes" if same else "NO"])
    n, width = features.shape[1:]
    return f"## CDPruner selection: N={n} tokens of width {width} (median ms)\n\n" + markdown_table(
        ["K", "batched, 1 image", f"batched, {batch} images", "per image", "plain Python loop, 1 image",
         "ratio batched / loop (1 image)", "same picks"], rows
    ) + (
        "\n\nAll include the kernel diag(r) S diag(r) from the projected tokens and a given relevance r. "
        "Batched: methods/cdpruner.py, one step per pick for every image at once, each step one Cholesky "
        "row over all tokens (no host synchronisation). Plain Python: per pick, a loop over the tokens on "
        f"Python floats (one image; {batch} images take {batch} times as long). The {batch} images are the "
        "image's tokens with 1% noise each."
    )


@torch.inference_mode()
def plain_python_dpp(features: torch.Tensor, relevance: torch.Tensor, k: int) -> list[int]:
    """CDPruner's greedy MAP as plain Python loops over the tokens (kernel entries as Python floats)."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    r = relevance.float()
    kernel = (r[:, None] * (unit @ unit.T) * r[None]).tolist()
    n = len(kernel)
    gains = [kernel[i][i] for i in range(n)]
    rows: list[list[float]] = []
    picks: list[int] = []
    for _ in range(k):
        best = max((i for i in range(n) if i not in picks), key=gains.__getitem__)
        if gains[best] <= EXHAUSTED:
            raise ValueError("the kernel's rank is below K; choose a wider model or a smaller K")
        root = gains[best] ** 0.5
        row = [(kernel[best][i] - sum(c[best] * c[i] for c in rows)) / root for i in range(n)]
        rows.append(row)
        picks.append(best)
        gains = [g - e * e for g, e in zip(gains, row)]
    return picks


# ---------------------------------------------------------------------------------------------
# report


def totals(runs: list[dict[str, float]], stages: tuple[str, ...]) -> list[float]:
    """Per run, the ms summed over ``stages``."""
    return [sum(run.get(stage, 0.0) for stage in stages) for run in runs]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _header(args: argparse.Namespace, device: torch.device, n_visual: int, prompt_len: int) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "# Method overhead\n\n"
        f"`python -m benchmarks.method_overhead {' '.join(sys.argv[1:])}`\n\n"
        f"Model {args.model} ({args.dtype}) on {device_name(device)}; batch 1, a prompt of {prompt_len} "
        f"tokens with N={n_visual} visual tokens; median of {args.repeats} runs after {args.warmup} warm-up; "
        f"torch {torch.__version__}, transformers {transformers.__version__}; {when}."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.method_overhead",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
