"""The built-in tiny LLaVA (``builtin:tiny-llava``): the recipe that trains it from scratch.

    prunebench train tiny-llava --out prunebench/models/assets/tiny-llava

The model is LLaVA-1.5's architecture at toy width (models.BUILTIN_SPEC): a CLIP tower on 96-px
images with 4-px patches (576 visual tokens, LLaVA-1.5's count), an MLP projector and a Llama
decoder, trained on the built-in world (tasks/synthetic.py, stream ``train``; the evaluation sets
are other streams). Joint next-token training from scratch stays at chance on this data, so:

1. vision: the CLIP tower alone, with linear heads reading every patch feature the projector
   consumes (``hidden_states[-2]``) for what covers the patch (colour, shape, character, the whole
   printed string, whether it is a string's first character, how many shapes of its kind the image
   holds, the characters to its left and right) and where it is (row, column), and the CLS token
   for which objects are present. Two heads of the first tower layer start out attending to the
   patch on the left / right (``neighbour_heads``): learnt from scratch, the tower never tells left
   from right and finds a number's first digit at chance. With them colour, shape, character,
   first character and neighbours are read at 1.00; string 0.89, count far less well.
2. reader: the LLM alone learns the conversations from ideal visual tokens (the stage-3 targets
   computed from the true labels, only the patches that show something), no vision involved, at
   ~0.28-0.55 s/step, in phases: existence questions alone (the mixed reader never learns them: it
   answers a constant), the mix of every kind, side-of-the-image questions, side and
   left/right-of questions (one per sequence: left/right-of is learnt only after the decoder has
   learnt where one named object is), then quota conversations that hold every kind in fixed
   shares, so that the skills learnt one at a time are kept together. Without a reader the QA loss
   stays at the answer prior for 600+ steps of stage 4.
3. projector alignment (LLaVA's stage 1 in spirit): vision frozen, the projector alone learns to
   map each patch feature to the sum of the input embeddings of its label words (colour, shape,
   count, and for text the character, not the whole string: the decoder composes a string from its
   characters' tokens) plus a column code and, on a string's first character, a start code
   (``_word_targets``), so visual tokens enter the LLM as the words the reader learnt from.
   Printed characters weigh 25x in the loss: the decoder reads strings from these few tokens.
4. language: vision frozen; projector and Llama learn question answering with several questions
   per image in one multi-turn sequence (the 576 visual tokens are paid once per image; quota
   conversations) and the image's caption as the last turn (every object and the string, in
   reading order), loss on the answers only. A curriculum first shows every patch that holds
   something but few background patches (at their original positions for half of the images,
   re-indexed 0, 1, 2, ... for the other half, as pre-LLM pruning feeds them), then more, until the
   full unpruned input for the second half of training.

``RECIPES["mix"]`` is an earlier recipe (no position phases, no marks, no neighbour heads): it
reads text as well but answers left/right-of by its prior. The shipped model's scores, training
times and the experiments behind each choice: reports/builtin/tiny-llava-training.md.

Every step logs; probe accuracy per question kind (single-question prompts, exactly the
evaluation format, from a held-out stream) is logged every ``eval_every`` steps and saved with the
model (``training_log.json``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from prunebench.engine.adapters import LlavaAdapter
from prunebench.models.tiny import BUILTIN_SPEC, PROMPT_TEMPLATE, build_processor, build_tokenizer, tiny_llava_config
from prunebench.tasks import synthetic as world

LOG_NAME = "training_log.json"
CURVE_NAME = "learning_curve.md"
HANDOVER_NAME = "handover.json"
READER_PHASES = ("existence", "reader", "side", "comparison", "quota")  # in training order (Trainer.train_reader)
# the Recipe fields only the language stage reads: a saved handover state (the model before the
# language stage) can be finished with other values of these, and must match in every other field
LANGUAGE_ONLY = {"language_data", "language_quotas", "language_numbers", "language_steps", "distractors_start",
                 "distractors_full", "reindexed_share", "eval_every", "probes", "threads"}


# the language stage's conversations (stream offset 10**8 for quota: the reader's quota phase uses 0...)
LANGUAGE_DATA = {
    "mix": lambda r, index: world.training_example(r.seed, index, turns=r.turns),
    "quota": lambda r, index: world.quota_example(r.seed, 10**8 + index, turns=r.turns, quotas=r.language_quotas,
                                                  numbers=r.language_numbers),
}


@dataclass
class Recipe:
    vision_steps: int = 400
    vision_batch: int = 32
    vision_lr: float = 3e-3
    # reader phase 1: existence questions only. The mixed reader never learns them (it answers a
    # constant) while an existence-only phase does, and unlocks colour -> shape retrieval too
    # (reports/builtin/tiny-llava-training.md)
    existence_steps: int = 1000
    reader_steps: int = 1000  # then the mix: see Trainer.train_reader (its loss is flat after ~1500)
    # then the position curriculum (one question per sequence): side of the image, then side and
    # left/right-of 50/50; then every kind at once in quota conversations (0: skipped)
    side_steps: int = 600
    comparison_steps: int = 800
    quota_steps: int = 1250
    projector_steps: int = 600
    projector_lr: float = 3e-3
    # loss weight of a printed character's patch in projector alignment (background 1, shapes 5): the
    # decoder reads strings from these few tokens, and a reader trained after the position phases
    # reads them only when they are close to their targets (training report)
    projector_text_weight: float = 25.0
    # mark the first character of a printed string: a vision head learns it, and its ideal token
    # carries a fixed code for it. Two digits sit in adjacent columns, whose column codes barely
    # differ, and without the mark numbers are read with their digits swapped (training report)
    string_start: bool = True
    # start two heads of the tower's first layer attending to the patch left / right of each patch.
    # Learnt from scratch, the tower never tells left from right: it places a word's letters by
    # their identity, but a 2-digit number's first digit it finds at chance (training report)
    neighbour_heads: bool = True
    language_data: str = "quota"  # the language stage's conversations: "mix" (training_example) or "quota"
    # quota conversations of the language stage: questions drawn per image of each of world.QUOTA_KINDS
    # (existence, text, position, other), and the share of printed strings that are numbers. Numbers
    # are the slowest skill (at 0.5, each of 90 is seen 4.5x less often than each of 20 words)
    language_quotas: tuple[int, ...] = (3, 2, 2, 2)
    language_numbers: float = 0.5
    language_steps: int = 1000  # number probes still rose at 900 steps (0.78 at 800, 0.95 at 900)
    language_batch: int = 16
    language_lr: float = 1e-3
    turns: int = 6  # questions per image in one training sequence
    distractors_start: float = 0.02  # share of background patches shown at the first language step
    distractors_full: float = 0.5  # ... rising to all of them by this share of the language steps
    # share of those thinned inputs given re-indexed positions (pre-LLM methods' default policy):
    # a model trained only at original positions answers far worse at re-indexed ones
    reindexed_share: float = 0.5
    warmup: int = 30
    eval_every: int = 100
    probes: int = 240
    seed: int = 0
    threads: int = 2

    def __post_init__(self):  # fail before training, not when the language stage starts
        if self.language_data not in LANGUAGE_DATA:
            raise ValueError(f"language_data {self.language_data!r}; valid choices: {', '.join(LANGUAGE_DATA)}")
        if len(self.language_quotas) != len(world.QUOTA_KINDS) or min(self.language_quotas) < 0:
            raise ValueError(f"language_quotas {self.language_quotas}: one count >= 0 per kind of {world.QUOTA_KINDS}")


# the recipe the shipped model was trained with, and an earlier one
# ("mix"): no position phases and no string-start mark, so left/right-of stays at its prior
# ("left", GQA 85.8 %); text 97.6 %, POPE F1 100.0 (training report)
RECIPES = {
    "default": Recipe(),
    "mix": Recipe(existence_steps=1250, reader_steps=1250, side_steps=0, comparison_steps=0, quota_steps=0,
                  projector_steps=150, projector_text_weight=5.0, string_start=False, neighbour_heads=False,
                  language_data="mix", language_quotas=(2, 2, 2, 2), language_steps=1300),
}


def _background_fraction(step: int, r: Recipe) -> float:
    """Curriculum: the share of background patches shown, from ``distractors_start`` up to all of
    them at ``distractors_full`` of the language steps (then the real, unpruned input)."""
    ramp = r.distractors_full * r.language_steps
    if step >= ramp:
        return 1.0
    return r.distractors_start + (1 - r.distractors_start) * (step / ramp) ** 2


def _alignment_weights(scenes: list[world.Scene], shown: torch.Tensor, text_weight: float) -> torch.Tensor:
    """``(B, 576)`` loss weights of projector alignment: background 1, shapes 5 (as the vision heads:
    objects cover ~10 % of the patches), printed characters ``text_weight`` (~0.4 % of them)."""
    text = torch.stack([torch.from_numpy(world.patch_labels(s)["char"].reshape(-1) > 0) for s in scenes])
    return torch.where(text, text_weight, 1.0 + 4.0 * shown.float())


def _causal_only(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """None for a right-padded batch (each row: its tokens, then padding), else the mask. Under
    causal attention a token never sees the padding after it, so with the default positions every
    labelled token's loss is the same without the mask, and SDPA's causal kernel skips the upper
    triangle (fwd + bwd of one layer at 16 x 751 tokens, 2 CPU cores: 0.13 s, 0.22 s with the
    padding mask). Not with explicit position ids: without a mask transformers reads their gaps as
    packed sequences."""
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    return None if right_padded else attention_mask


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class VisionHeads(nn.Module):
    """Linear read-outs of the projector's input features: per patch and for the CLS token."""

    def __init__(self, width: int, grid: int, string_start: bool = False):
        super().__init__()
        chars = world.PATCH_LABELS["char"]
        classes = dict(world.PATCH_LABELS, row=grid, column=grid, char_left=chars, char_right=chars)
        if string_start:
            classes["string_start"] = 2
        self.patch = nn.ModuleDict({name: nn.Linear(width, n) for name, n in classes.items()})
        self.present = nn.Linear(width, len(world.COLOURS) * len(world.SHAPES) + 1)  # pairs + "text"

    def forward(self, hidden: torch.Tensor, labels: dict[str, torch.Tensor], present: torch.Tensor):
        feats = F.layer_norm(hidden, hidden.shape[-1:])
        cls, patches = feats[:, 0], feats[:, 1:]
        losses, accuracy = {}, {}
        for name, head in self.patch.items():
            logits, target = head(patches).flatten(0, 1), labels[name].flatten()
            if name in world.PATCH_LABELS:  # objects cover ~10 % of the patches: weigh them up
                weight, on = 1.0 + 4.0 * (target > 0).float(), target > 0
            else:  # position: every patch; neighbours' characters, string start: character patches only (-1 elsewhere)
                weight, on = (target >= 0).float(), target >= 0
            error = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
            losses[name] = (error * weight).sum() / weight.sum().clamp(min=1)
            accuracy[name] = float((logits.argmax(-1)[on] == target[on]).float().mean())
        losses["present"] = F.binary_cross_entropy_with_logits(self.present(cls), present)
        return sum(losses.values()), accuracy


def _neighbour_chars(char: torch.Tensor, grid: int) -> dict[str, torch.Tensor]:
    """``(B, 576)`` character labels -> the characters left and right of each character patch (0:
    none), -1 on other patches. Reading a string needs its neighbours; these targets make the tower
    attend to them (string read-out 0.28 -> 0.52 at 350 steps, training report)."""
    chars = char.view(-1, grid, grid)
    off = char == 0
    left = F.pad(chars, (1, 0))[:, :, :-1].flatten(1).masked_fill(off, -1)
    right = F.pad(chars, (0, 1))[:, :, 1:].flatten(1).masked_fill(off, -1)
    return {"char_left": left, "char_right": right}


def _position_freqs(d: int) -> torch.Tensor:
    """The ``d`` frequencies (radians per patch) of each block of the 2-D position embeddings."""
    return 1.0 / (100.0 ** (torch.arange(d) / d))


def _init_positions_2d(weight: torch.Tensor, grid: int) -> None:
    """2-D sine-cosine initial position embeddings (CLS: zeros): patches start out knowing their
    neighbours, which the tower otherwise learns slowly from scratch. Still learned afterwards."""
    d = weight.shape[1] // 4
    freqs = _position_freqs(d)
    rows = torch.arange(grid).repeat_interleave(grid)[:, None] * freqs
    columns = torch.arange(grid).repeat(grid)[:, None] * freqs
    table = torch.cat([rows.sin(), rows.cos(), columns.sin(), columns.cos()], dim=1)
    with torch.no_grad():
        weight.zero_()
        weight[1:, : table.shape[1]] = table * 2.0  # x0.5 taught neighbour attention (strings) slower


def _init_neighbour_heads(attention: nn.Module, sharpness: float = 12.0) -> None:
    """Heads 0 and 1 of ``attention`` (the tower's first layer) start out attending to the patch
    one column to the left / right in the same row: their queries and keys read the 2-D sine-cosine
    position embeddings' four highest frequencies (``_init_positions_2d``), the query rotated by one
    column. ~0.9 of the attention lands on that neighbour; training then moves them freely."""
    head = attention.head_dim
    d = attention.embed_dim // 4  # the embedding's blocks: sin rows, cos rows, sin columns, cos columns
    freqs = _position_freqs(d)
    with torch.no_grad():
        for h, shift in ((0, -1.0), (1, 1.0)):
            q = torch.zeros(head, attention.embed_dim)
            k = torch.zeros(head, attention.embed_dim)
            for j in range(head // 4):  # 4 dims per frequency: (cos, sin) of the column, then of the row
                angle = float(freqs[j]) * shift
                sin_c, cos_c, sin_r, cos_r = 2 * d + j, 3 * d + j, j, d + j
                # q . k = cos(f (c' - c - shift)) + cos(f (r' - r)): largest at c' = c + shift, r' = r
                q[4 * j, cos_c], q[4 * j, sin_c] = math.cos(angle), -math.sin(angle)
                q[4 * j + 1, sin_c], q[4 * j + 1, cos_c] = math.cos(angle), math.sin(angle)
                k[4 * j, cos_c], k[4 * j + 1, sin_c] = 1.0, 1.0
                q[4 * j + 2, cos_r], q[4 * j + 3, sin_r] = 1.0, 1.0
                k[4 * j + 2, cos_r], k[4 * j + 3, sin_r] = 1.0, 1.0
            rows = slice(h * head, (h + 1) * head)
            attention.q_proj.weight[rows] = q * sharpness
            attention.k_proj.weight[rows] = k
            attention.q_proj.bias[rows] = 0.0
            attention.k_proj.bias[rows] = 0.0


def _present(scene: world.Scene) -> np.ndarray:
    pairs = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    out = np.zeros(len(pairs) + 1, dtype=np.float32)
    for s in scene.shapes:
        out[pairs.index((s.colour, s.shape))] = 1
    out[-1] = bool(scene.texts)
    return out


class Trainer:
    def __init__(self, recipe: Recipe, console: Console):
        self.recipe, self.console = recipe, console
        from transformers import LlavaForConditionalGeneration

        torch.manual_seed(recipe.seed)
        self.tokenizer = build_tokenizer()
        self.processor = build_processor(self.tokenizer, BUILTIN_SPEC)
        self.model = LlavaForConditionalGeneration(tiny_llava_config(BUILTIN_SPEC, self.tokenizer))
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.grid = BUILTIN_SPEC.image_size // BUILTIN_SPEC.patch_size
        self.n_image = self.grid * self.grid
        self.log: list[dict] = []
        self._token_cache: dict[str, list[int]] = {}
        self.started = time.perf_counter()
        self.probes = self._probe_set(recipe.probes)

    # -- data ----------------------------------------------------------------------------------
    def _pixels(self, scenes: list[world.Scene]) -> torch.Tensor:
        images = [world.render(s) for s in scenes]
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def _encode(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels of a multi-turn LLaVA-1.5 conversation; the first turn is the
        evaluation prompt exactly (its <image> expanded to the image's tokens)."""
        ids: list[int] = []
        labels: list[int] = []
        for i, (prompt, answer) in enumerate(turns):
            text = PROMPT_TEMPLATE.format(question=prompt) if i == 0 else f"USER: {prompt} ASSISTANT:"
            text = text.replace("<image>", "<image>" * self.n_image)
            p = self._ids(text)
            a = self._ids(answer) + [self.tokenizer.eos_token_id]
            ids += p + a
            labels += [-100] * len(p) + a
        return ids, labels

    def _ids(self, text: str) -> list[int]:
        """Token ids of ``text``, memoized: prompts and answers repeat across the training stream."""
        if text not in self._token_cache:
            if len(self._token_cache) >= 100_000:
                self._token_cache.clear()
            self._token_cache[text] = self.tokenizer(text)["input_ids"]
        return list(self._token_cache[text])

    def _batch(self, conversations: list[list[tuple[str, str]]],
               scenes: list[world.Scene] | None) -> dict[str, torch.Tensor]:
        """Padded ids, mask and labels; and the rendered images unless ``scenes`` is None (the
        reader stage needs no pixels)."""
        encoded = [self._encode(c) for c in conversations]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded]),
        }
        if scenes is not None:
            batch["pixel_values"] = self._pixels(scenes)
        return batch

    def _probe_set(self, n: int) -> list[tuple[str, world.Scene, str, str]]:
        """Held-out single questions (stream ``probe``), by kind."""
        probes = []
        for i in range(n):
            task = world.TASKS[i % len(world.TASKS)]
            sample = world.task_sample(task, seed=10_000 + self.recipe.seed, index=i // len(world.TASKS))
            probes.append((f"{task}:{sample.kind}", sample.scene, world.prompt_text(task, sample.question), sample.answer))
        return probes

    # -- stages --------------------------------------------------------------------------------
    def train_vision(self) -> None:
        r = self.recipe
        vision = self.model.model.vision_tower
        inner = getattr(vision, "vision_model", vision)
        _init_positions_2d(inner.embeddings.position_embedding.weight, self.grid)
        if r.neighbour_heads:
            _init_neighbour_heads(inner.encoder.layers[0].self_attn)
        heads = VisionHeads(BUILTIN_SPEC.vision_width, self.grid, r.string_start)
        adapter = LlavaAdapter(self.model)
        params = list(vision.parameters()) + list(heads.parameters())
        optimizer = torch.optim.AdamW(params, lr=r.vision_lr, weight_decay=0.01)
        rows = torch.arange(self.grid).repeat_interleave(self.grid)
        columns = torch.arange(self.grid).repeat(self.grid)
        for step in range(r.vision_steps):
            scenes = [world.vision_scene(r.seed, step * r.vision_batch + i) for i in range(r.vision_batch)]
            per_scene = [world.patch_labels(s) for s in scenes]
            labels = {name: torch.stack([torch.from_numpy(p[name].reshape(-1)) for p in per_scene])
                      for name in world.PATCH_LABELS}
            labels["row"], labels["column"] = rows.expand(len(scenes), -1), columns.expand(len(scenes), -1)
            labels.update(_neighbour_chars(labels["char"], self.grid))
            if r.string_start:
                labels["string_start"] = torch.stack([torch.from_numpy(world.string_starts(s).reshape(-1)) for s in scenes])
            present = torch.from_numpy(np.stack([_present(s) for s in scenes]))
            hidden = adapter.encode_images(self._pixels(scenes)).hidden_states[-1]  # CLS + the projector's input
            loss, accuracy = heads(hidden, labels, present)
            self._step(optimizer, params, loss, _lr(step, r.vision_steps, r.vision_lr, r.warmup))
            self._record("vision", step, loss, accuracy)

    def _word_targets(self, scenes: list[world.Scene], embeddings: torch.Tensor,
                      column_code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 576, D)`` targets and ``(B, 576)`` which patches show something. For each patch,
        the sum of the input embeddings of the words a question about it would use or answer with
        (colour, shape, the shape's count, the printed character), plus a code of its column (and,
        with ``string_start``, a code on a string's first character); background patches get the
        ``<image>`` token's embedding.

        A printed string enters as its characters, one per visual token in reading order, and the
        decoder composes them: the tower reads a character at 1.00 but a whole string at ~0.5, so
        a string's own word reached the decoder only half the time (training report)."""
        tokens = self.tokenizer.convert_tokens_to_ids
        vocab = embeddings.shape[0]  # index ``vocab``: no word
        table = {
            "colour": torch.tensor([vocab, *tokens(list(world.COLOURS)), vocab]),
            "shape": torch.tensor([vocab, *tokens(list(world.SHAPES)), tokens("text")]),
            "count": torch.tensor([vocab, *tokens([str(n) for n in range(1, world.PATCH_LABELS["count"])])]),
            "char": torch.tensor([vocab, *tokens(list(world.CHARACTERS))]),
        }
        per_scene = [world.patch_labels(scene) for scene in scenes]
        # (B, 576, groups) word ids; a background patch is the <image> token alone
        words = torch.stack([torch.stack([table[g][torch.from_numpy(labels[g].reshape(-1))] for g in table], -1)
                             for labels in per_scene])
        shown = torch.stack([torch.from_numpy(labels["shape"].reshape(-1) > 0) for labels in per_scene])
        words[~shown] = torch.tensor([tokens("<image>")] + [vocab] * (len(table) - 1))
        # each patch's word counts times the table: a matmul, whose backward into the embeddings is
        # far cheaper on CPU than indexing's (index_put was ~18 % of a reader step)
        counts = embeddings.new_zeros(*words.shape[:2], vocab + 1).scatter_add_(2, words, embeddings.new_ones(words.shape))
        counts = counts[..., :vocab]
        out = counts @ embeddings + column_code
        if self.recipe.string_start:
            start = torch.stack([torch.from_numpy(world.string_starts(scene).reshape(-1) == 1) for scene in scenes])
            out = out + start[..., None] * self._code(embeddings, salt=1)
        return out, shown

    def _code(self, embeddings: torch.Tensor, salt: int) -> torch.Tensor:
        """``(D,)``: a fixed random direction (one per ``salt``) at the mean embedding norm."""
        generator = torch.Generator().manual_seed(self.recipe.seed + salt)
        direction = F.normalize(torch.randn(embeddings.shape[1], generator=generator), dim=0)
        return direction * embeddings.detach().norm(dim=1).mean()

    def _column_code(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(576, D)``: each patch's column along one fixed direction, from -1 (left) to +1 (right)
        times the mean embedding norm, so that left/right can be read off a visual token."""
        columns = torch.arange(self.grid).repeat(self.grid).float()
        return (2 * columns / (self.grid - 1) - 1)[:, None] * self._code(embeddings, salt=0)

    def train_reader(self) -> None:
        """The LLM (embeddings included) learns the training conversations with each patch given as
        its ideal visual token, the sum of its label words' embeddings (``_word_targets``, which the
        projector stage then aims at), only the patches that show something: short sequences that
        teach the in-context retrieval cheaply before real visual tokens are involved."""
        r = self.recipe
        self._reader_phase("existence", r.existence_steps, lambda i: world.existence_example(r.seed, i, turns=r.turns))
        self._reader_phase("reader", r.reader_steps, lambda i: world.training_example(r.seed, 10**8 + i, turns=r.turns))
        self._reader_phase("side", r.side_steps, lambda i: world.position_example(r.seed, i, relation_share=0.0))
        self._reader_phase("comparison", r.comparison_steps,
                           lambda i: world.position_example(r.seed, 10**8 + i, relation_share=0.5))
        self._reader_phase("quota", r.quota_steps, lambda i: world.quota_example(r.seed, i, turns=r.turns))

    def _reader_phase(self, stage: str, steps: int, example) -> None:
        """``steps`` reader steps on ``example(index)`` conversations, with a fresh optimizer and its
        own warmup and cosine schedule."""
        r = self.recipe
        params = [p for n, p in self.model.named_parameters() if "vision_tower" not in n and "projector" not in n]
        optimizer = torch.optim.AdamW(params, lr=r.language_lr, weight_decay=0.01)
        embeddings = self.model.get_input_embeddings().weight
        for step in range(steps):
            examples = [example(step * r.language_batch + i) for i in range(r.language_batch)]
            scenes = [scene for scene, _ in examples]
            batch = self._batch([turns for _, turns in examples], None)
            visual, _ = self._word_targets(scenes, embeddings, self._column_code(embeddings))
            loss = self._thinned_loss(batch, scenes, 0.0, step, visual=visual)
            self._step(optimizer, params, loss, _lr(step, steps, r.language_lr, r.warmup))
            self._record(stage, step, loss, None)

    def train_projector(self) -> None:
        """Alignment (LLaVA's stage 1 in spirit): vision frozen, the projector alone learns to map
        each patch feature to the sum of its label words' embeddings, so that visual tokens enter
        the LLM as words it can match the question against and copy into the answer."""
        from prunebench.training.losses import vision_features

        r = self.recipe
        adapter = LlavaAdapter(self.model)
        projector = self.model.model.multi_modal_projector
        embeddings = self.model.get_input_embeddings().weight.detach().clone()
        scale = float(embeddings.norm(dim=1).mean())
        column_code = self._column_code(embeddings)
        optimizer = torch.optim.AdamW(projector.parameters(), lr=r.projector_lr, weight_decay=0.0)
        for step in range(r.projector_steps):
            scenes = [world.training_example(r.seed, 10**7 + step * r.vision_batch + i)[0] for i in range(r.vision_batch)]
            target, shown = self._word_targets(scenes, embeddings, column_code)
            projected = adapter.project(vision_features(adapter, self._pixels(scenes)))
            error = ((projected - target) ** 2).sum(-1) / scale**2
            weight = _alignment_weights(scenes, shown, r.projector_text_weight)
            loss = (error * weight).sum() / weight.sum()
            self._step(optimizer, list(projector.parameters()), loss, _lr(step, r.projector_steps, r.projector_lr, r.warmup))
            self._record("projector", step, loss, None)

    def train_language(self) -> None:
        r = self.recipe
        self.model.model.vision_tower.requires_grad_(False)
        params = [p for n, p in self.model.named_parameters() if "vision_tower" not in n]
        optimizer = torch.optim.AdamW(params, lr=r.language_lr, weight_decay=0.01)
        conversation = LANGUAGE_DATA[r.language_data]
        for step in range(r.language_steps):
            examples = [conversation(r, step * r.language_batch + i) for i in range(r.language_batch)]
            scenes = [scene for scene, _ in examples]
            batch = self._batch([turns for _, turns in examples], scenes)
            fraction = _background_fraction(step, r)
            if fraction >= 1:
                loss = self.model(**batch | {"attention_mask": _causal_only(batch["attention_mask"])}).loss
            else:
                generator = torch.Generator().manual_seed(r.seed * 7919 + step)
                reindex = torch.rand(len(scenes), generator=generator) < r.reindexed_share
                loss = self._thinned_loss(batch, scenes, fraction, step, reindex=reindex)
            self._step(optimizer, params, loss, _lr(step, r.language_steps, r.language_lr, r.warmup))
            probe = self.probe() if (step + 1) % r.eval_every == 0 or step + 1 == r.language_steps else None
            self._record("language", step, loss, probe)

    def _thinned_loss(self, batch: dict[str, torch.Tensor], scenes: list[world.Scene], fraction: float,
                      step: int, visual: torch.Tensor | None = None,
                      reindex: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token loss with every patch that shows something kept but only ``fraction`` of
        the background ones, at their original positions (as the engine prunes under the "original"
        policy), or re-indexed 0, 1, 2, ... where ``reindex[b]`` (the "reindex" policy, the default
        of pre-LLM methods). Few distractors make the answer-bearing tokens easy to find early on."""
        from prunebench.training.losses import decoder_loss, vision_features

        adapter = LlavaAdapter(self.model)
        if visual is None:  # (B, 576, D); the projector trains
            visual = adapter.project(vision_features(adapter, batch["pixel_values"]))
        generator = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + step)
        rows, labels, positions = [], [], []
        for b, scene in enumerate(scenes):
            ids, lab = batch["input_ids"][b], batch["labels"][b]
            length = int(batch["attention_mask"][b].sum())
            start = int((ids == adapter.image_token_id).nonzero()[0])
            shown = torch.from_numpy(world.patch_labels(scene)["shape"].reshape(-1) > 0)
            keep = (shown | (torch.rand(self.n_image, generator=generator) < fraction)).nonzero()[:, 0]
            end = start + self.n_image
            rows.append(torch.cat([adapter.embed(ids[:start]), visual[b, keep], adapter.embed(ids[end:length])]))
            labels.append(torch.cat([lab[:start], torch.full((len(keep),), -100), lab[end:length]]))
            if reindex is not None and reindex[b]:
                positions.append(torch.arange(start + len(keep) + length - end))
            else:
                positions.append(torch.cat([torch.arange(start), start + keep, torch.arange(end, length)]))
        width = max(len(x) for x in rows)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows])
        hidden = torch.stack([F.pad(x, (0, 0, 0, width - len(x))) for x in rows])
        labels = torch.stack([F.pad(x, (0, width - len(x)), value=-100) for x in labels])
        positions = torch.stack([F.pad(x, (0, width - len(x))) for x in positions])
        return decoder_loss(adapter, hidden, mask, positions, labels)

    @torch.no_grad()
    def probe(self) -> dict[str, float]:
        """Greedy first-token accuracy of the answer, per task:kind, on the held-out probes."""
        self.model.eval()
        hits: dict[str, list[bool]] = {}
        for start in range(0, len(self.probes), 40):
            chunk = self.probes[start:start + 40]
            batch = self._batch([[(prompt, answer)] for _, _, prompt, answer in chunk], [s for _, s, _, _ in chunk])
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=batch["pixel_values"]).logits
            first = (batch["labels"] != -100).int().argmax(-1)  # the answer's first token
            predicted = logits[torch.arange(len(chunk)), first - 1].argmax(-1)
            for (kind, *_), pred, target in zip(chunk, predicted, batch["input_ids"][torch.arange(len(chunk)), first]):
                hits.setdefault(kind, []).append(bool(pred == target))
        self.model.train()
        return {kind: sum(h) / len(h) for kind, h in sorted(hits.items())}

    def _step(self, optimizer, params, loss: torch.Tensor, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def _record(self, stage: str, step: int, loss: torch.Tensor, metrics: dict | None) -> None:
        entry = {"stage": stage, "step": step + 1, "loss": round(float(loss.detach()), 5),
                 "seconds": round(time.perf_counter() - self.started, 1)}
        if metrics:
            entry["accuracy"] = {k: round(v, 4) for k, v in metrics.items()}
        self.log.append(entry)
        if (stage == "language" and metrics) or (step + 1) % 25 == 0:
            shown = "  ".join(f"{k} {v:.2f}" for k, v in (metrics or {}).items())
            self.console.print(f"{stage} {step + 1:5d}  loss {entry['loss']:.4f}  {entry['seconds']:7.1f}s  {shown}",
                               soft_wrap=True)

    def save_handover(self, directory: Path) -> None:
        """The state before the language stage (weights, recipe, log so far), to finish it with other
        language-stage settings (``load_handover``) without rerunning the ~40 minutes before it."""
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        record = {"recipe": asdict(self.recipe), "seconds": round(time.perf_counter() - self.started, 1), "log": self.log}
        (directory / HANDOVER_NAME).write_text(json.dumps(record) + "\n")

    def load_handover(self, directory: Path) -> None:
        from transformers import LlavaForConditionalGeneration

        path = directory / HANDOVER_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {HANDOVER_NAME}; make one with `prunebench train tiny-llava --handover DIR`")
        record = json.loads(path.read_text())
        mine = json.loads(json.dumps(asdict(self.recipe)))
        differ = sorted(k for k in mine if k not in LANGUAGE_ONLY and record["recipe"].get(k) != mine[k])
        if differ:
            raise ValueError(f"{directory}: the handover was trained with other settings before the language stage: "
                             + ", ".join(f"{k} {record['recipe'].get(k)!r} (this recipe: {mine[k]!r})" for k in differ))
        self.model = LlavaForConditionalGeneration.from_pretrained(directory)
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.log = record["log"]
        self.started = time.perf_counter() - record["seconds"]  # the saved model's time counts from the start

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.model.eval()
        self.model.save_pretrained(out)
        self.processor.save_pretrained(out)
        record = {"recipe": asdict(self.recipe), "seconds": round(time.perf_counter() - self.started, 1),
                  "threads": torch.get_num_threads(), "log": self.log}
        (out / LOG_NAME).write_text(json.dumps(record, indent=1) + "\n")
        (out / CURVE_NAME).write_text(learning_curve(record))


def learning_curve(record: dict) -> str:
    """Markdown: probe accuracy per question kind at every evaluation step of the language stage."""
    rows = [e for e in record["log"] if e["stage"] == "language" and "accuracy" in e]
    if not rows:
        return "no evaluation steps were logged\n"
    kinds = list(rows[-1]["accuracy"])
    r = record["recipe"]
    lines = [
        (f"Training of builtin:tiny-llava: {r['vision_steps']} vision steps (batch {r['vision_batch']}), "
         f"{' + '.join(str(r.get(f'{phase}_steps', 0)) for phase in READER_PHASES)} reader steps "
         f"({' / '.join(READER_PHASES)}), {r.get('projector_steps', 0)} projector steps, then "
         f"{r['language_steps']} language steps (batch {r['language_batch']} images x {r['turns']} questions); "
         f"{record['seconds'] / 60:.1f} min on {record['threads']} CPU threads. Probe accuracy (greedy first "
         f"answer token, {r['probes']} held-out questions):"),
        "",
        "| step | loss | min | " + " | ".join(kinds) + " |",
        "|---" * (len(kinds) + 3) + "|",
    ]
    for e in rows:
        cells = " | ".join(f"{e['accuracy'].get(k, float('nan')):.2f}" for k in kinds)
        lines.append(f"| {e['step']} | {e['loss']:.3f} | {e['seconds'] / 60:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def train(recipe: Recipe, out: Path, console: Console | None = None, handover: Path | None = None,
          from_handover: Path | None = None) -> Trainer:
    """Every stage, saving the state before the language stage to ``handover`` if given; or only the
    language stage, from the state saved in ``from_handover``."""
    torch.set_num_threads(recipe.threads)
    trainer = Trainer(recipe, console or Console(stderr=True))
    if from_handover is not None:
        trainer.load_handover(from_handover)
    else:
        trainer.model.train()
        trainer.train_vision()
        trainer.train_reader()
        trainer.train_projector()
        if handover is not None:
            trainer.save_handover(handover)
    trainer.model.train()
    trainer.train_language()
    trainer.save(out)
    return trainer
