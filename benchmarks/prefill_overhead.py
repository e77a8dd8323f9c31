"""Engine overhead: prefill with pre-LLM pruning vs. the model fed only K visual tokens ("ideal").

    python -m benchmarks.prefill_overhead [--model random:mid-llava] [--budgets 576,192,64]

"pruned" is the engine's prefill stage (decoder layers, norm, lm_head on the last token) after
`random` kept K of 576 tokens; the pruner's own time is reported beside it. "ideal" runs the
same decoder through HF's own LlamaModel.forward on a sequence that holds K visual tokens from
the start (SDPA, KV cache on), plus lm_head on the last token. A ratio near 1 means the engine's
layer loop, masks and bookkeeping cost nothing beyond the tokens it keeps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from prunebench.budget import Budget
from prunebench.engine.generate import PruningEngine
from prunebench.engine.method import create_method
from prunebench.models.tiny import PROMPT_TEMPLATE
from prunebench.models.loading import load_model
from prunebench.engine.timing import StageClock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:mid-llava")
    parser.add_argument("--budgets", default="576,192,64")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="reports/prefill_overhead_cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, processor = load_model(args.model)
    engine = PruningEngine(model, processor.tokenizer)
    prompt = PROMPT_TEMPLATE.format(question="what color is the circle on the left of the image ?")
    size = model.config.vision_config.image_size
    image = torch.randint(0, 255, (size, size, 3), dtype=torch.uint8).numpy()
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    n_visual = engine.adapter.visual_tokens_per_image

    rows = []
    for k in (int(b) for b in args.budgets.split(",")):
        method, ideal_inputs = create_method("random"), _ideal_inputs(engine, inputs, k)
        pruned, pruner, ideal = [], [], []
        for i in range(args.warmup + args.repeats):  # engine and ideal passes alternate: drift hits both
            clock = StageClock("cpu")
            with torch.inference_mode():
                engine.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], method,
                               Budget.parse(k), clock)
            ideal_ms = _ideal_prefill(engine, ideal_inputs)
            if i >= args.warmup:
                summary = clock.summary()
                pruned.append(summary["prefill"])
                pruner.append(summary.get("pruner", 0.0))
                ideal.append(ideal_ms)
        rows.append((k, statistics.median(pruner), statistics.median(pruned), statistics.median(ideal)))

    lines = [
        (f"Prefill on `{args.model}` ({n_visual} visual tokens, {engine.adapter.num_layers} decoder layers), "
         f"CPU, {args.threads} threads, median of {args.repeats} alternating passes after {args.warmup} warm-up."),
        (f"Command: `python -m benchmarks.prefill_overhead --model {args.model} --budgets {args.budgets} "
         f"--repeats {args.repeats}`"),
        "",
        "| K | pruner ms | pruned prefill ms | ideal prefill ms | pruned / ideal |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {p:.2f} | {pr:.1f} | {i:.1f} | {pr / i:.3f} |" for k, p, pr, i in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


def _ideal_inputs(engine: PruningEngine, inputs, k: int) -> torch.Tensor:
    """Embeddings of the prompt with its image span cut to K tokens (the model fed K from the start)."""
    adapter = engine.adapter
    ids = inputs["input_ids"][0]
    visual = ids == adapter.image_token_id
    first = int(visual.nonzero()[0])
    keep = torch.cat([torch.arange(first), torch.arange(first, first + k), torch.arange(first + int(visual.sum()), len(ids))])
    with torch.inference_mode():
        return adapter.embed(ids[keep][None])


@torch.inference_mode()
def _ideal_prefill(engine: PruningEngine, embeds: torch.Tensor) -> float:
    """ms of HF's own decoder forward (SDPA, KV cache on) + lm_head on the last token."""
    adapter = engine.adapter
    start = time.perf_counter()
    # the decoder's cache argument was renamed with its layers' (engine.cache_argument)
    out = adapter.decoder(inputs_embeds=embeds, use_cache=True,
                          **{engine.cache_argument: DynamicCache(config=adapter.decoder.config)})
    adapter.lm_head(out.last_hidden_state[:, -1:])
    return 1000 * (time.perf_counter() - start)


if __name__ == "__main__":
    main()
