"""`prunebench train autoselect|gumbel`: train a learned token selector on a frozen VLM.
(`prunebench train tiny-llava` trains the built-in model instead: prunebench/training/recipe.py.)

    prunebench train autoselect --model llava-hf/llava-1.5-7b-hf --data captions.jsonl --out sel/
    accelerate launch --num_processes 8 -m prunebench train autoselect ...   # DDP over 8 GPUs

AutoSelect: next-token loss on the answer/caption tokens through the frozen vision tower,
projector and LLM, with the scorer's soft top-K gate and the denoiser between the vision
features and the projector. Gumbel: reconstruction of the vision features only (no LLM, no text).
AdamW with cosine learning-rate decay; the soft top-K temperature is cosine-annealed from 2.0 to
0.1 over the first 2,000 steps (or over all steps, when fewer). Budget: AutoSelect samples K
uniformly in 64..192 per batch by default, so one scorer serves every budget (``--budget 64`` fixes
K); for Gumbel ``--budget`` sets the kept-fraction floor p (default 25 %). ``--drop P``: in a share P
of AutoSelect's steps the selection is made as inference makes it: the hard top-K (of
Gumbel-perturbed logits) alone goes to the projector and the LLM, the other tokens dropped from the
sequence and positions re-indexed, with a straight-through LapSum gradient; the other steps keep
all N positions and noise the unselected tokens (the paper's gate).

Every random draw (batch order, K, noise) is a function of (seed, step, process), so ``--resume``
continues a run exactly as if it had not stopped. Checkpoints hold safetensors only.
"""

from __future__ import annotations

import io
import json
import math
import random
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler

from prunebench.engine.adapters import LlavaAdapter, adapter_for
from prunebench.budget import Budget, BudgetError
from prunebench.errors import UserError
from prunebench.models.tiny import PROMPT_TEMPLATE
from prunebench.models.loading import load_model
from prunebench.training.losses import autoselect_loss, gumbel_loss, vision_features
from prunebench.training.selectors import (
    KINDS,
    CheckpointError,
    build_selector,
    load_selector,
    read_config,
    save_selector,
)

CAPTION_PROMPT = "describe this image ."
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"
LOG_NAME = "log.jsonl"
DEFAULT_BUDGET = {"autoselect": "64-192", "gumbel": "25%"}
ROLES = ("image", "caption", "question", "answer")
# column names tried, in order, when --columns does not name them
COLUMN_GUESSES = {
    "image": ("image", "img", "image_path", "jpg", "png"),
    "caption": ("caption", "text", "description", "caption_enriched", "enriched_caption"),
    "question": ("question", "prompt", "instruction"),
    "answer": ("answer", "response", "label_text"),
}


class DataError(UserError, ValueError):
    """Training data that cannot be found or read."""


class OptionError(UserError, ValueError):
    """A training option out of range or not among the valid choices."""


@dataclass
class TrainConfig:
    selector: str  # autoselect | gumbel
    out: str
    model: str = "random:tiny-llava"
    data: str = "synthetic"
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)  # role -> column name overrides
    budget: str | None = None  # None: DEFAULT_BUDGET[selector]
    steps: int = 4000
    lr: float = 2e-4
    weight_decay: float = 0.01
    batch_size: int = 8  # per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    tau_start: float = 2.0
    tau_end: float = 0.1
    tau_steps: int | None = None  # None: min(2000, steps)
    depth: int | None = None  # None: 2 (autoselect scorer) / 3 (gumbel selector and reconstructor)
    width: int | None = None  # autoselect scorer width; None: the vision width
    heads: int | None = None
    gate: str = "vp"
    gate_norm: str = "channel"
    denoiser: str = "diagonal"
    drop: float = 0.0  # autoselect: share of steps that drop the unselected tokens and re-index, as inference
    seed: int = 0
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    save_every: int = 500
    log_every: int = 10
    num_workers: int = 0
    gradient_checkpointing: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if self.selector not in KINDS:
            raise OptionError(f"unknown selector {self.selector!r}; valid choices: {', '.join(KINDS)}")
        self.budget = self.budget or DEFAULT_BUDGET[self.selector]
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) <= 0:
                raise OptionError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.tau_end <= self.tau_start:
            raise OptionError(f"need 0 < tau_end <= tau_start, got {self.tau_start} -> {self.tau_end}")
        self.tau_steps = self.tau_steps or min(2000, self.steps)
        if self.tau_steps < 0:
            raise OptionError(f"--tau-steps must be positive, got {self.tau_steps}")
        if not 0.0 <= self.drop <= 1.0 or (self.drop and self.selector != "autoselect"):
            raise OptionError(f"--drop {self.drop}: the share of AutoSelect steps that drop tokens, in [0, 1]")
        unknown = set(self.columns) - set(ROLES)
        if unknown:
            raise OptionError(f"unknown column role(s) {sorted(unknown)}; valid roles: {', '.join(ROLES)}")


# ---------------------------------------------------------------------------------------------
# schedules


def tau_at(cfg: TrainConfig, step: int) -> float:
    """Cosine from tau_start to tau_end over tau_steps, then flat."""
    t = min(step / cfg.tau_steps, 1.0)
    return cfg.tau_end + 0.5 * (cfg.tau_start - cfg.tau_end) * (1 + math.cos(math.pi * t))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Cosine decay from lr to 0 over the run."""
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / cfg.steps))


def parse_budget_range(text: str, n_tokens: int) -> tuple[int, int]:
    """``"64"`` / ``"25%"`` -> (K, K); ``"64-192"`` / ``"10%-30%"`` -> the range K is drawn from."""
    low, sep, high = text.partition("-")
    try:
        ends = [Budget.parse(part).resolve(n_tokens) for part in ((low, high) if sep else (low, low))]
    except BudgetError as err:
        raise BudgetError(f"--budget {text!r}: {err} (write K, a fraction, or a range like 64-192)") from None
    if ends[0] > ends[1] or Budget.parse(low).is_all:
        raise BudgetError(f"--budget {text!r}: give K, a fraction, or a range low-high with low <= high")
    return ends[0], ends[1]


def budget_at(cfg: TrainConfig, step: int, n_tokens: int) -> int:
    low, high = parse_budget_range(cfg.budget, n_tokens)
    return random.Random(f"{cfg.seed}:{step}:budget").randint(low, high)


def drop_at(cfg: TrainConfig, step: int) -> bool:
    """Whether AutoSelect's step ``step`` drops the unselected tokens (a share ``cfg.drop`` of steps)."""
    return cfg.drop > 0 and random.Random(f"{cfg.seed}:{step}:drop").random() < cfg.drop


def keep_floor(cfg: TrainConfig, n_tokens: int) -> float:
    low, high = parse_budget_range(cfg.budget, n_tokens)
    if low != high:
        raise BudgetError(f"gumbel: --budget sets the kept-fraction floor p and takes one value, not {cfg.budget!r}")
    return low / n_tokens


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Example:
    image: Image.Image
    question: str
    answer: str


class BuiltinQuestions(Dataset):
    """Questions about the built-in world (tasks/synthetic.py, its ``train`` stream: never the
    evaluation sets): one image and one question-answer pair per item, in the built-in tasks'
    prompt format. Item ``i`` is a pure function of (seed, i), so no file is needed."""

    def __init__(self, size: int = 512, seed: int = 0):
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Example:
        from prunebench.tasks import synthetic

        scene, turns = synthetic.training_example(self.seed, index, turns=1)
        prompt, answer = turns[0]
        return Example(synthetic.render(scene), prompt, answer)


class RecordExamples(Dataset):
    """Rows (dicts) of a JSONL file, a parquet file or a Hugging Face dataset."""

    def __init__(self, rows, source: str, columns: dict[str, str], base: Path | None, caption_prompt: str):
        self.rows, self.source, self.base, self.caption_prompt = rows, source, base, caption_prompt
        names = list(rows.column_names) if hasattr(rows, "column_names") else sorted({k for row in rows for k in row})
        self.columns = _match_columns(names, columns, source)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        row = self.rows[index]
        c = self.columns
        image = self._image(row.get(c["image"]), index)
        if "question" in c:
            return Example(image, str(row[c["question"]]), str(row[c["answer"]]))
        return Example(image, self.caption_prompt, str(row[c["caption"]]))

    def _image(self, value: Any, index: int) -> Image.Image:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):  # the parquet encoding of HF image columns
            value = value.get("bytes") or value.get("path")
        try:
            if isinstance(value, (bytes, bytearray)):
                return Image.open(io.BytesIO(value)).convert("RGB")
            if isinstance(value, str):
                path = Path(value) if self.base is None or Path(value).is_absolute() else self.base / value
                return Image.open(path).convert("RGB")
        except (OSError, ValueError) as err:
            raise DataError(f"{self.source}, row {index}: cannot read image {str(value)[:200]!r} ({err})") from None
        raise DataError(f"{self.source}, row {index}: image column holds {type(value).__name__}, not a path or bytes")


def _match_columns(names: list[str], overrides: dict[str, str], source: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for role in ROLES:
        if role in overrides:
            if overrides[role] not in names:
                raise DataError(f"{source}: --columns {role}={overrides[role]} names no column; columns: {names}")
            found[role] = overrides[role]
        else:
            guess = next((n for n in COLUMN_GUESSES[role] if n in names), None)
            if guess:
                found[role] = guess
    qa = "question" in found and "answer" in found
    if "image" not in found or not (qa or "caption" in found):
        raise DataError(
            f"{source}: need an image column and a caption (or question + answer) column; found columns "
            f"{names}. Name them with --columns image=COL,caption=COL (or question=COL,answer=COL)"
        )
    if not qa:
        found.pop("question", None)
        found.pop("answer", None)
    return found


def open_dataset(spec: str, split: str = "train", columns: dict[str, str] | None = None,
                 caption_prompt: str = CAPTION_PROMPT) -> Dataset:
    """``synthetic[:N]``, a ``.jsonl``/``.parquet`` file, or a Hugging Face dataset id (downloaded on demand)."""
    columns = columns or {}
    if spec == "synthetic" or spec.startswith("synthetic:"):
        _, _, size = spec.partition(":")
        if size and not size.isdigit():
            raise DataError(f"--data {spec!r}: write synthetic or synthetic:N (N examples)")
        return BuiltinQuestions(int(size or 512))
    path = Path(spec)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise DataError(f"--data {spec!r}: no such file")
        if path.suffix == ".parquet":
            import pandas as pd

            rows = pd.read_parquet(path).to_dict("records")
        else:
            rows = _read_jsonl(path)
        return RecordExamples(rows, spec, columns, path.parent, caption_prompt)
    if path.exists():
        raise DataError(f"--data {spec!r}: give a .jsonl or .parquet file, a Hugging Face dataset id, or synthetic")
    return RecordExamples(_hub_dataset(spec, split), spec, columns, None, caption_prompt)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _hub_dataset(repo_id: str, split: str):
    """A Hugging Face dataset, downloaded on demand when the hub is reachable, else from the local
    cache (failing at once, with what to run on a connected machine, when it is not there)."""
    from prunebench.models.hub import HubUnavailableError, snapshot

    try:
        local = snapshot(repo_id, repo_type="dataset")
    except HubUnavailableError as err:
        raise DataError(f"--data {repo_id!r}: not a .jsonl/.parquet file, and {err} (--data synthetic runs a smoke test)") from None
    import datasets

    try:
        return datasets.load_dataset(local, split=split)
    except ValueError as err:  # e.g. an unknown split
        raise DataError(f"--data {repo_id!r} (split {split!r}): {err}") from None


class Collator:
    """Examples -> a right-padded batch: prompt + answer + EOS, labels only on answer and EOS."""

    def __init__(self, processor, with_text: bool = True):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.with_text = with_text
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        images = [ex.image for ex in examples]
        if not self.with_text:
            return {"pixel_values": self.processor.image_processor(images, return_tensors="pt")["pixel_values"]}
        rows, labels, pixels = [], [], []
        for ex in examples:
            prompt = PROMPT_TEMPLATE.format(question=ex.question)
            encoded = self.processor(images=[ex.image], text=[f"{prompt} {ex.answer}"], return_tensors="pt")
            ids = encoded["input_ids"][0].tolist() + [self.tokenizer.eos_token_id]
            # the prompt's length once its single <image> is expanded to the image's tokens
            n_image = ids.count(self.image_token_id)
            n_prompt = len(self.tokenizer(prompt)["input_ids"]) + n_image - 1
            rows.append(ids)
            labels.append([-100] * n_prompt + ids[n_prompt:])
            pixels.append(encoded["pixel_values"])
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
            "pixel_values": torch.cat(pixels),
        }


class StepBatches(Sampler[list[int]]):
    """Batch indices for micro-batches ``start..stop`` of this process: a seeded permutation per
    epoch, the global batch split across processes. A pure function of its arguments (resumable)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int, stop: int):
        self.n, self.batch, self.rank, self.world, self.seed, self.start, self.stop = n, batch, rank, world, seed, start, stop
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=generator))
        return self._perm[1]

    def __iter__(self) -> Iterator[list[int]]:
        for micro in range(self.start, self.stop):
            first = (micro * self.world + self.rank) * self.batch
            yield [int(self._permutation(p // self.n)[p % self.n]) for p in range(first, first + self.batch)]


# ---------------------------------------------------------------------------------------------
# training


def build_module(cfg: TrainConfig, vision_width: int, n_tokens: int):
    """The untrained selector, initialised from ``cfg.seed``."""
    if cfg.selector == "autoselect":
        options = {"vision_width": vision_width, "width": cfg.width, "depth": cfg.depth or 2, "heads": cfg.heads,
                   "gate": cfg.gate, "gate_norm": cfg.gate_norm, "denoiser": cfg.denoiser}
    else:
        options = {"vision_width": vision_width, "n_tokens": n_tokens, "depth": cfg.depth or 3, "heads": cfg.heads,
                   "keep_floor": keep_floor(cfg, n_tokens)}
    torch.manual_seed(cfg.seed)
    try:
        return build_selector(cfg.selector, **options)
    except ValueError as err:  # e.g. a width the heads do not divide
        raise OptionError(f"{cfg.selector}: {err}") from None


def train(cfg: TrainConfig, model=None, processor=None, console: Console | None = None) -> list[dict]:
    """Run (or resume) training; returns the per-step log. ``model``/``processor``: already loaded
    (else ``cfg.model`` is loaded). The model's own weights are frozen and never change."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # a dropping step leaves the denoiser out, as inference does: DDP must allow unused parameters
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.drop > 0)])
    device = accelerator.device
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    _check_out(out, cfg)
    if model is None:
        model, processor = _load_frozen(cfg, device)
    model.requires_grad_(False)
    model.to(device)
    adapter = adapter_for(model)
    if not isinstance(adapter, LlavaAdapter):
        # NeXT (anyres crops, newline tokens) and Qwen2-VL (variable grids, M-RoPE) need their own
        # collator, feature padding and positions here; the selectors already run on Qwen2-VL
        raise OptionError(
            f"prunebench train supports LLaVA-1.5-style models (a fixed grid of visual tokens per image); "
            f"{type(model).__name__} is not one. Selector training for LLaVA-NeXT and Qwen2-VL is not built: "
            f"train on a LLaVA-1.5 model (e.g. --model builtin:tiny-llava or llava-hf/llava-1.5-7b-hf)"
        )
    dataset = open_dataset(cfg.data, cfg.split, cfg.columns)
    first = Collator(processor, with_text=False)([dataset[0]])["pixel_values"].to(device, model.dtype)
    _, n_tokens, vision_width = vision_features(adapter, first).shape
    parse_budget_range(cfg.budget, n_tokens)  # a budget this model cannot meet fails before training starts

    module = build_module(cfg, vision_width, n_tokens)
    start = 0
    if cfg.resume:
        module, start = _load_resume(out, cfg, module)
        if accelerator.is_main_process:
            _trim_log(out / LOG_NAME, start)
    optimizer = torch.optim.AdamW(module.to(device).train().parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.resume:
        _load_optimizer(out / OPTIMIZER_NAME, optimizer)
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    sampler = StepBatches(len(dataset), cfg.batch_size, accelerator.process_index, accelerator.num_processes,
                          cfg.seed, start * cfg.grad_accum, cfg.steps * cfg.grad_accum)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(processor, cfg.selector == "autoselect"),
                        num_workers=cfg.num_workers)
    with _gradient_checkpointing(model, adapter, cfg.gradient_checkpointing):
        history = _loop(cfg, accelerator, wrapped, optimizer, adapter, iter(loader), start, n_tokens, console)
    if accelerator.is_main_process:
        console.print(f"saved {cfg.selector} checkpoint to {out} (step {cfg.steps}); use it with "
                      f"--methods {cfg.selector}:ckpt={out}", soft_wrap=True)
    return history


def _loop(cfg: TrainConfig, accelerator, wrapped, optimizer, adapter: LlavaAdapter, batches, start: int,
          n_tokens: int, console: Console) -> list[dict]:
    """Optimizer steps ``start..cfg.steps``: schedules, gradient accumulation, logging, checkpoints."""
    device, rank, main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    out = Path(cfg.out)
    history: list[dict] = []
    fields_text = "loss {task.fields[loss]:.4f}  tau {task.fields[tau]:.3f}  {task.fields[extra]}"
    progress = Progress(TextColumn(f"[bold]train {cfg.selector}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn(fields_text),
                        console=console, disable=not main)
    with progress:
        task = progress.add_task("train", total=cfg.steps, completed=start, loss=float("nan"), tau=tau_at(cfg, start), extra="")
        for step in range(start, cfg.steps):
            tau, lr = tau_at(cfg, step), lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            k = budget_at(cfg, step, n_tokens) if cfg.selector == "autoselect" else None
            drop = drop_at(cfg, step)
            total, logs = 0.0, {}
            for micro in range(cfg.grad_accum):
                batch = {name: t.to(device) for name, t in next(batches).items()}
                batch["pixel_values"] = batch["pixel_values"].to(adapter.model.dtype)
                generator = torch.Generator(device=device).manual_seed(_seed(cfg.seed, step, micro, rank))
                sync = micro == cfg.grad_accum - 1  # all-reduce gradients only on the last micro-batch
                with (nullcontext() if sync else accelerator.no_sync(wrapped)), accelerator.autocast():
                    if k is not None:
                        loss, logs = autoselect_loss(wrapped, adapter, batch, k, tau, generator, drop)
                    else:
                        loss, logs = gumbel_loss(wrapped, adapter, batch, tau, generator)
                    accelerator.backward(loss / cfg.grad_accum)
                total += float(accelerator.reduce(loss.detach(), "mean")) / cfg.grad_accum
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "loss": total, "tau": tau, "lr": lr, **({"k": k} if k is not None else {}),
                      **({"drop": drop} if cfg.drop else {}), **logs}
            history.append(record)
            extra = f"K {k}" if k is not None else f"mse {logs['mse']:.4f} kept {logs['kept']:.2f}"
            progress.update(task, advance=1, loss=total, tau=tau, extra=extra)
            last = step + 1 == cfg.steps
            if main and ((step + 1) % cfg.log_every == 0 or last):
                with (out / LOG_NAME).open("a") as log:
                    log.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.save_every == 0 or last:
                accelerator.wait_for_everyone()
                if main:
                    save_checkpoint(out, accelerator.unwrap_model(wrapped), optimizer, cfg, step + 1)
    return history


def _load_frozen(cfg: TrainConfig, device: torch.device):
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return load_model(cfg.model, device=str(device), dtype=dtype)  # a model neither cached nor downloadable: UserError


@contextmanager
def _gradient_checkpointing(model, adapter: LlavaAdapter, enabled: bool):
    """Recompute the LLM's activations in backward; the model is left as it was found."""
    if not enabled:
        yield
        return
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter.decoder.train()  # HF checkpoints only in train mode (Llama has no dropout to switch on)
    try:
        yield
    finally:
        adapter.decoder.eval()
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def save_checkpoint(out: Path, module, optimizer, cfg: TrainConfig, step: int) -> None:
    """Weights + config (what inference needs), then optimizer state and step (what resume needs)."""
    extra = {"model": cfg.model, "step": step, "training": _training_record(cfg)}
    save_selector(out, module, extra)
    state = optimizer.state_dict()["state"]
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, entry in state.items() for name, value in entry.items() if torch.is_tensor(value)}
    tmp = out / f".{OPTIMIZER_NAME}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / OPTIMIZER_NAME)
    (out / STATE_NAME).write_text(json.dumps({"step": step, "selector": cfg.selector}) + "\n")


def _training_record(cfg: TrainConfig) -> dict:
    record = asdict(cfg)
    for name in ("out", "resume", "num_workers"):
        record.pop(name)
    return record


def _check_out(out: Path, cfg: TrainConfig) -> None:
    has_state = (out / STATE_NAME).is_file()
    if cfg.resume and not has_state:
        raise CheckpointError(f"--resume: {str(out)!r} holds no training state ({STATE_NAME}); start without --resume")
    if not cfg.resume and has_state:
        raise CheckpointError(
            f"{str(out)!r} already holds a training run ({cfg.selector}); pass --resume to continue it "
            f"or choose another --out"
        )


def _load_resume(out: Path, cfg: TrainConfig, fresh) -> tuple[Any, int]:
    record = read_config(out, cfg.selector)
    wanted = asdict(fresh.config)
    if record["config"] != wanted:
        diff = {key: (record["config"].get(key), value) for key, value in wanted.items() if record["config"].get(key) != value}
        raise CheckpointError(
            f"--resume: the run in {str(out)!r} has a different architecture (checkpoint vs requested: {diff}); "
            "resume with its settings or choose another --out"
        )
    try:
        step = int(json.loads((out / STATE_NAME).read_text())["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{out / STATE_NAME} is corrupt ({err!r})") from None
    if step >= cfg.steps:
        raise CheckpointError(f"--resume: the run in {str(out)!r} already reached step {step}; pass --steps > {step}")
    return load_selector(out, cfg.selector), step


def _trim_log(path: Path, step: int) -> None:
    """Drop log entries written after the checkpoint being resumed: those steps run again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is missing or corrupt ({err}); it is needed to resume") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _seed(*parts: int) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


# ---------------------------------------------------------------------------------------------
# command line


# the built-in model's training stages, in order (prunebench/training/recipe.py), each with a --<stage>-steps flag
