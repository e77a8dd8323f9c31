"""Session 14 diagnostic: why reading learnt after the position phases does not transfer to real
visual tokens. `train` runs vision + the run-3 reader + projector and saves the handover state;
`analyse` probes that state with ideal, real and mixed visual tokens."""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from prunebench.tasks import synthetic as world
from rich.console import Console

from prunebench import builtin
from prunebench.adapters import LlavaAdapter
from prunebench.train import vision_features

OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/h14")


def recipe(**kw):
    base = {"existence_steps": 1000, "reader_steps": 1000, "side_steps": 600, "comparison_steps": 800, "quota_steps": 1250}
    base.update(kw)
    return replace(builtin.RECIPES["mix"], **base)  # session 14 ran from the then-default recipe


def train():
    torch.set_num_threads(2)
    t = builtin.Trainer(recipe(), Console(stderr=True))
    t.model.train()
    t.train_vision(); t.train_reader(); t.train_projector()
    OUT.mkdir(parents=True, exist_ok=True)
    t.model.save_pretrained(OUT)
    (OUT / "log.json").write_text(json.dumps(t.log))
    print("saved", time.perf_counter() - t.started)


def probe_items(n_per_kind=60, seed=20_000):
    items = {}
    for task in world.TASKS:
        i = 0
        while any(len(items.get(f"{task}:{k}", [])) < n_per_kind for k in kinds_of(task)) and i < 20 * n_per_kind:
            s = world.task_sample(task, seed, i); i += 1
            key = f"{task}:{s.kind}"
            if len(items.setdefault(key, [])) < n_per_kind:
                items[key].append((s.scene, world.prompt_text(task, s.question), s.answer))
    return items


def kinds_of(task):
    return {"synth-gqa": world.GQA_KINDS, "synth-textvqa": ("number", "word"),
            "synth-pope": ("present", "adversarial", "random")}[task]


@torch.no_grad()
def accuracy(t, items, variant):
    adapter = LlavaAdapter(t.model)
    emb = t.model.get_input_embeddings().weight
    col = t._column_code(emb)
    d = F.normalize(torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(t.recipe.seed)), dim=0)
    hits = []
    for start in range(0, len(items), 40):
        chunk = items[start:start + 40]
        scenes = [s for s, _, _ in chunk]
        batch = t._batch([[(p, a)] for _, p, a in chunk], scenes)
        ideal, shown = t._word_targets(scenes, emb, col)
        real = adapter.project(vision_features(adapter, batch["pixel_values"]))
        text = torch.stack([torch.from_numpy(world.patch_labels(s)["char"].reshape(-1) > 0) for s in scenes])
        reindex = variant.endswith("_reindexed")
        variant = variant.removesuffix("_reindexed")
        if variant == "ideal":
            vis, keep = ideal, shown
        elif variant == "real":
            vis, keep = real, shown
        elif variant == "real_full":
            vis, keep = real, torch.ones_like(shown)
        elif variant == "ideal_full":  # ideal objects among real background
            vis, keep = torch.where(shown[..., None], ideal, real), torch.ones_like(shown)
        elif variant == "real_exactcol":
            vis = real - (real @ d)[..., None] * d + (ideal @ d)[..., None] * d
            keep = shown
        elif variant == "real_text_ideal":
            vis, keep = torch.where(text[..., None], ideal, real), shown
        elif variant == "ideal_text_real":
            vis, keep = torch.where(text[..., None], real, ideal), shown
        elif variant == "real_nocol_text":  # text patches: real minus their column component
            vis = torch.where(text[..., None], real - (real @ d)[..., None] * d, real); keep = shown
        elif variant == "ideal_nocol_text":
            vis = torch.where(text[..., None], ideal - (ideal @ d)[..., None] * d, ideal); keep = shown
        else:
            raise ValueError(variant)
        rows, pos, targets, where = [], [], [], []
        for b in range(len(chunk)):
            ids, lab = batch["input_ids"][b], batch["labels"][b]
            length = int(batch["attention_mask"][b].sum())
            s0 = int((ids == adapter.image_token_id).nonzero()[0]); e0 = s0 + t.n_image
            k = keep[b].nonzero()[:, 0]
            rows.append(torch.cat([adapter.embed(ids[:s0]), vis[b, k], adapter.embed(ids[e0:length])]))
            pos.append(torch.arange(s0 + len(k) + length - e0) if reindex else
                       torch.cat([torch.arange(s0), s0 + k, torch.arange(e0, length)]))
            first = int((lab != -100).nonzero()[0])
            where.append(first - 1 - (t.n_image - len(k))); targets.append(int(ids[first]))
        w = max(len(x) for x in rows)
        mask = torch.tensor([[1] * len(x) + [0] * (w - len(x)) for x in rows])
        h = torch.stack([F.pad(x, (0, 0, 0, w - len(x))) for x in rows])
        p = torch.stack([F.pad(x, (0, w - len(x))) for x in pos])
        out = adapter.decoder(inputs_embeds=h, attention_mask=mask, position_ids=p, use_cache=False).last_hidden_state
        pred = adapter.lm_head(out[torch.arange(len(chunk)), torch.tensor(where)]).argmax(-1)
        hits += (pred == torch.tensor(targets)).tolist()
    return sum(hits) / len(hits)


def errors(t, items):
    """Relative error of real against ideal tokens, text and shape patches, and along the column direction."""
    adapter = LlavaAdapter(t.model)
    emb = t.model.get_input_embeddings().weight
    col = t._column_code(emb)
    d = F.normalize(torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(t.recipe.seed)), dim=0)
    scale = float(emb.norm(dim=1).mean())
    scenes = [s for s, _, _ in items[:64]]
    with torch.no_grad():
        ideal, shown = t._word_targets(scenes, emb, col)
        real = adapter.project(vision_features(adapter, t._pixels(scenes)))
    text = torch.stack([torch.from_numpy(world.patch_labels(s)["char"].reshape(-1) > 0) for s in scenes])
    out = {}
    for name, m in (("text", text), ("shape", shown & ~text), ("background", ~shown)):
        e = (real - ideal)[m]
        out[name] = {"rel": float(e.norm(dim=-1).mean() / ideal[m].norm(dim=-1).mean()),
                         "col_err_in_columns": float(((e @ d).abs().mean()) / (scale * 2 / 23))}
    return out


def analyse():
    from transformers import LlavaForConditionalGeneration
    torch.set_num_threads(2)
    t = builtin.Trainer(recipe(), Console(stderr=True))
    t.model = LlavaForConditionalGeneration.from_pretrained(OUT).eval()
    items = probe_items(int(sys.argv[3]) if len(sys.argv) > 3 else 40)
    print(json.dumps(errors(t, items["synth-textvqa:word"] + items["synth-gqa:colour"]), indent=1))
    variants = sys.argv[4].split(",") if len(sys.argv) > 4 else [
        "ideal", "real", "real_full", "ideal_full", "real_exactcol", "real_text_ideal", "ideal_text_real",
        "real_nocol_text", "ideal_nocol_text", "ideal_reindexed", "real_reindexed"]
    for v in variants:
        print(v, " ".join(f"{k.split(':')[1]} {accuracy(t, it, v):.2f}" for k, it in items.items()), flush=True)


if __name__ == "__main__" and sys.argv[1] in ("train", "analyse"):
    {"train": train, "analyse": analyse}[sys.argv[1]]()


def language():
    """argv: lang OUT STEPS FREEZE LR: STEPS language steps from the handover state, the decoder frozen
    for the first FREEZE (projector alone), peak lr LR; probes (real, full input) every 50 steps."""
    from transformers import LlavaForConditionalGeneration
    torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 2)
    steps, freeze, lr = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    t = builtin.Trainer(recipe(language_steps=1300), Console(stderr=True))
    t.model = LlavaForConditionalGeneration.from_pretrained(OUT)
    t.model.train()
    t.probes = t._probe_set(240)
    r = t.recipe
    t.model.model.vision_tower.requires_grad_(False)
    proj = [p for n, p in t.model.named_parameters() if "projector" in n]
    dec = [p for n, p in t.model.named_parameters() if "vision_tower" not in n and "projector" not in n]
    opt = torch.optim.AdamW([{"params": proj}, {"params": dec}], lr=lr, weight_decay=0.01)
    for step in range(steps):
        examples = [world.quota_example(r.seed, 10**8 + step * r.language_batch + i, turns=r.turns) for i in range(r.language_batch)]
        scenes = [s for s, _ in examples]
        batch = t._batch([c for _, c in examples], scenes)
        frac = builtin._background_fraction(step, r)
        g = torch.Generator().manual_seed(r.seed * 7919 + step)
        loss = t._thinned_loss(batch, scenes, frac, step, reindex=torch.rand(len(scenes), generator=g) < r.reindexed_share)
        cur = builtin._lr(step, r.language_steps, lr, r.warmup)
        opt.param_groups[0]["lr"] = cur
        opt.param_groups[1]["lr"] = 0.0 if step < freeze else cur
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(proj + dec, 1.0); opt.step()
        if (step + 1) % 50 == 0:
            acc = t.probe()
            print(step + 1, f"loss {float(loss):.3f}", " ".join(f"{k.split(':')[1][:5]} {v:.2f}" for k, v in acc.items()), flush=True)


if __name__ == "__main__" and sys.argv[1] == "lang":
    language()


def projector():
    """argv: proj OUT STEPS TEXT_WEIGHT LR THREADS: re-align the projector from a fresh init at the
    handover state, text patches weighted TEXT_WEIGHT (shapes 5), then the errors and thin probes.
    (Session 14 ran this as a copy of the alignment loop, before the weight was a recipe field.)"""
    from transformers import LlavaForConditionalGeneration
    torch.set_num_threads(int(sys.argv[6]))
    steps, text_weight, lr = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    t = builtin.Trainer(recipe(projector_steps=steps, projector_lr=lr, projector_text_weight=text_weight),
                        Console(stderr=True))
    t.model = LlavaForConditionalGeneration.from_pretrained(OUT)
    torch.manual_seed(1)
    for m in t.model.model.multi_modal_projector.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    start = time.perf_counter()
    t.model.train()
    t.train_projector()  # the recipe's alignment stage, with this weight and length
    loss = t.log[-1]["loss"]
    print(f"projector {steps} steps, text weight {text_weight}, lr {lr}: {time.perf_counter() - start:.0f}s, loss {loss:.4f}")
    t.model.eval()
    items = probe_items(40)
    print(json.dumps(errors(t, items["synth-textvqa:word"] + items["synth-gqa:colour"])))
    for v in ("real", "real_full"):
        print(v, " ".join(f"{k.split(':')[1]} {accuracy(t, it, v):.2f}" for k, it in items.items()), flush=True)
    t.model.save_pretrained(Path(sys.argv[7]) if len(sys.argv) > 7 else OUT.with_name(f"{OUT.name}-p{steps}-{text_weight:g}"))


if __name__ == "__main__" and sys.argv[1] == "proj":
    projector()


def finish():
    """argv: finish HANDOVER OUT: the candidate recipe's language stage from a saved handover state."""
    from transformers import LlavaForConditionalGeneration
    r = builtin.RECIPES["position"]
    torch.set_num_threads(r.threads)
    t = builtin.Trainer(r, Console(stderr=True))
    t.model = LlavaForConditionalGeneration.from_pretrained(OUT)
    t.model.generation_config.pad_token_id = t.tokenizer.pad_token_id
    t.model.train()
    t.train_language()
    t.save(Path(sys.argv[3]))


if __name__ == "__main__" and sys.argv[1] == "finish":
    finish()
