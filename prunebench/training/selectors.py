"""Trainable token selectors and their checkpoints (peft-style: small modules on a frozen VLM).

AutoSelect (arXiv 2603.07135 / DiffPrune 2605.28051)::

    features X (B, N, d_v) -> Scorer -> logits s -> LapSum soft top-K alpha (sum = K)
      -> gate (vp: sqrt(a) x + sqrt(1-a) eps | scale: a x | gumbel_ste: hard top-K, soft gradient)
      -> denoiser (diagonal: one block, each token attends to itself | global | none)
      -> frozen projector -> frozen LLM, next-token loss on the answer
    inference: Scorer -> hard top-K of s (gate and denoiser are training-only)

Gumbel autoencoder (arXiv 2503.16660)::

    X -> Selector (3 blocks + head) -> keep logits -> binary Gumbel-Softmax mask m (straight-through)
      -> m x + (1 - m) [MASK] -> Reconstructor (3 blocks) -> X_rec
    loss = ||X_rec - X||^2 + max(mean(m), p); inference: top-K of the keep logits

A checkpoint is a directory holding ``config.json`` (kind, architecture, training settings) and
``model.safetensors`` (the trainable weights only). Loading validates both and names the problem.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prunebench.budget import Budget
from prunebench.engine.method import Method, MethodError, Selection, Stage

if TYPE_CHECKING:
    from prunebench.engine.signals import StageContext

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "prunebench-selector"
FORMAT_VERSION = 1

Gate = Literal["vp", "scale", "gumbel_ste"]
GateNorm = Literal["channel", "none"]
Denoiser = Literal["diagonal", "global", "none"]
GATES: tuple[str, ...] = ("vp", "scale", "gumbel_ste")
GATE_NORMS: tuple[str, ...] = ("channel", "none")
DENOISERS: tuple[str, ...] = ("diagonal", "global", "none")
KINDS: tuple[str, ...] = ("autoselect", "gumbel")


class CheckpointError(MethodError):
    """A selector checkpoint that is missing, unreadable, or made for another model."""


def train_hint(kind: str) -> str:
    return (
        f"train one with `prunebench train {kind} --model MODEL --data DATA --out DIR` "
        f"(e.g. --model builtin:tiny-llava --data synthetic)"
    )


# ---------------------------------------------------------------------------------------------
# building blocks


def default_heads(width: int) -> int:
    """16 heads of 64 dims at LLaVA scale (width 1024, the paper's); fewer at toy widths."""
    heads = min(16, max(1, width // 64))
    while width % heads:
        heads -= 1
    return heads


class Block(nn.Module):
    """Pre-norm Transformer encoder block. ``attention="diagonal"``: each token attends only to
    itself, so softmax over its single key is 1 and attention reduces to out(value(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, attention: str = "full"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if attention not in ("full", "diagonal"):
            raise ValueError(f"attention must be 'full' or 'diagonal', not {attention!r}")
        self.heads = heads
        self.attention = attention
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.attention == "diagonal":
            return self.out(v)
        batch, n, width = x.shape
        q, k, v = (t.view(batch, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(1, 2).reshape(batch, n, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def zero_residual(self) -> None:
        """Make the block the identity at initialisation (its two residual branches output 0)."""
        for linear in (self.out, self.mlp[-1]):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)


class TokenScorer(nn.Module):
    """``depth`` blocks then a linear head: one logit per token. Sees no text, no positions added
    (the encoder's features already carry them), so it works for any number of tokens."""

    def __init__(self, in_width: int, width: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.proj = nn.Identity() if width == in_width else nn.Linear(in_width, width)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, N, d_v)`` -> ``(B, N)`` float32 logits."""
        x = self.proj(features.float())
        return self.head(self.norm(self.blocks(x))).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# LapSum soft top-K


def laplace_cdf(x: torch.Tensor) -> torch.Tensor:
    """CDF of the standard Laplace distribution, evaluated without overflow on either side."""
    e = torch.exp(-x.abs())
    return torch.where(x <= 0, 0.5 * e, 1.0 - 0.5 * e)


def lapsum_topk(scores: torch.Tensor, k: int | torch.Tensor, tau: float, iters: int = 80) -> torch.Tensor:
    """Soft top-K weights ``alpha_i = F((s_i - b) / tau)`` in [0, 1] with ``sum_i alpha_i = k``.

    ``F`` is the Laplace CDF (LapSum, Struski et al. 2025). The offset ``b`` of each row is found
    by bisection in float64 (the sum is monotone in ``b``), then one differentiable Newton step
    from that root gives ``b`` the exact implicit gradient ``db/ds_j = f_j / sum_i f_i``.
    ``k``: an int or a ``(B,)`` tensor, ``0 < k <= N``; ``k = N`` gives all ones.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    n = scores.shape[-1]
    k_t = torch.as_tensor(k, dtype=torch.float64, device=scores.device).reshape(-1, *([1] * (scores.dim() - 1)))
    if bool((k_t <= 0).any()) or bool((k_t > n).any()):
        raise ValueError(f"k must lie in 1..{n} (the number of tokens), got {k}")
    x = scores.double() / tau
    full = k_t >= n
    k_solve = torch.where(full, torch.full_like(k_t, n - 0.5), k_t)  # placeholder for all-kept rows
    with torch.no_grad():
        # the sum is >= k at c = min(x) - log(n / (2 (n - k))) and <= k at c = max(x) + log(n / (2k))
        lo = x.amin(-1, keepdim=True) - torch.log(n / (2 * (n - k_solve))).clamp_min(0) - 1
        hi = x.amax(-1, keepdim=True) + torch.log(n / (2 * k_solve)).clamp_min(0) + 1
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = laplace_cdf(x - mid).sum(-1, keepdim=True) > k_solve
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        c0 = 0.5 * (lo + hi)
    residual = laplace_cdf(x - c0).sum(-1, keepdim=True) - k_solve
    slope = (0.5 * torch.exp(-(x - c0).abs())).sum(-1, keepdim=True)
    c = c0 + torch.where(slope > 0, residual / slope.clamp_min(1e-300), torch.zeros_like(residual))
    alpha = laplace_cdf(x - c)
    return torch.where(full, torch.ones_like(alpha), alpha).to(scores.dtype)


def hard_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, N)`` float mask with ones at the ``k`` largest scores of each row."""
    index = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores).scatter(-1, index, 1.0)


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    return -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))


# ---------------------------------------------------------------------------------------------
# AutoSelect


@dataclass
class AutoSelectConfig:
    vision_width: int
    width: int | None = None  # scorer width; None: the vision width
    depth: int = 2
    heads: int | None = None  # None: default_heads(width)
    mlp_ratio: float = 4.0
    gate: Gate = "vp"
    # vp gate: "channel" standardises each feature channel (batch statistics) before mixing in
    # unit noise and restores the scale after, so alpha = 0 erases a token whatever the encoder's
    # feature scale; "none" mixes the raw features with N(0, I) exactly as the formula reads.
    gate_norm: GateNorm = "channel"
    denoiser: Denoiser = "diagonal"

    def __post_init__(self) -> None:
        _check_choice("gate", self.gate, GATES)
        _check_choice("gate_norm", self.gate_norm, GATE_NORMS)
        _check_choice("denoiser", self.denoiser, DENOISERS)
        self.width = self.width or self.vision_width
        self.heads = self.heads or default_heads(self.width)
        _check_positive(vision_width=self.vision_width, width=self.width, depth=self.depth, heads=self.heads)


class AutoSelect(nn.Module):
    """Scorer (kept at inference) + gate and denoiser (training only)."""

    kind = "autoselect"

    def __init__(self, config: AutoSelectConfig):
        super().__init__()
        self.config = config
        c = config
        self.scorer = TokenScorer(c.vision_width, c.width, c.depth, c.heads, c.mlp_ratio)
        if c.denoiser == "none":
            self.denoiser: nn.Module = nn.Identity()
        else:
            heads = default_heads(c.vision_width)
            self.denoiser = Block(c.vision_width, heads, c.mlp_ratio, "diagonal" if c.denoiser == "diagonal" else "full")
            self.denoiser.zero_residual()  # starts as the identity: the projector sees its usual input

    def forward(
        self, features: torch.Tensor, k: int, tau: float, generator: torch.Generator | None = None, drop: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: ``(B, N, d_v)`` features -> (gated and denoised features, soft weights).

        ``drop``: the path of inference instead: the hard top-K of the Gumbel-perturbed logits
        alone goes on, neither noised nor denoised -> (``(B, K, d_v)`` kept features in their
        original order, ``(B, K)`` their indices). The kept features enter unchanged (times a
        straight-through factor that is exactly 1 forward) and carry the LapSum soft top-K's
        gradient to the scorer; the caller drops the other tokens from the sequence."""
        x = features.float()
        scores = self.scorer(x)
        if drop:
            perturbed = scores + gumbel_noise(scores, generator)
            keep = perturbed.detach().topk(k, dim=-1).indices.sort(-1).values
            soft = lapsum_topk(perturbed, k, tau)
            unit = (1.0 + (soft - soft.detach())).gather(1, keep)
            return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1])) * unit[..., None], keep
        if self.config.gate == "gumbel_ste":
            perturbed = scores + gumbel_noise(scores, generator)
            soft = lapsum_topk(perturbed, k, tau)
            alpha = hard_topk_mask(perturbed.detach(), k) + (soft - soft.detach())  # exactly 0/1 forward
            gated = alpha[..., None] * x
        else:
            alpha = lapsum_topk(scores, k, tau)
            gated = self._gate(x, alpha, generator)
        return self.denoiser(gated), alpha

    def _gate(self, x: torch.Tensor, alpha: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        a = alpha[..., None]
        if self.config.gate == "scale":
            return a * x
        if self.config.gate_norm == "channel":
            flat = x.detach().flatten(0, -2)
            mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
            x = (x - mean) / std
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # clamps keep the sqrt's gradient finite where a weight is exactly 0 or 1
        mixed = a.clamp_min(1e-12).sqrt() * x + (1 - a).clamp_min(1e-12).sqrt() * eps
        return mixed * std + mean if self.config.gate_norm == "channel" else mixed

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.scorer(features)


# ---------------------------------------------------------------------------------------------
# Gumbel-Softmax autoencoder


@dataclass
class GumbelConfig:
    vision_width: int
    n_tokens: int  # the reconstructor's learned positions; inference works for any count
    depth: int = 3
    heads: int | None = None
    mlp_ratio: float = 4.0
    keep_floor: float = 0.25  # p in max(kept fraction, p)

    def __post_init__(self) -> None:
        self.heads = self.heads or default_heads(self.vision_width)
        _check_positive(vision_width=self.vision_width, n_tokens=self.n_tokens, depth=self.depth, heads=self.heads)
        if not 0.0 <= self.keep_floor <= 1.0:
            raise ValueError(f"keep_floor must lie in [0, 1], got {self.keep_floor}")


class GumbelAutoencoder(nn.Module):
    kind = "gumbel"

    def __init__(self, config: GumbelConfig):
        super().__init__()
        self.config = config
        c = config
        self.selector = TokenScorer(c.vision_width, c.vision_width, c.depth, c.heads, c.mlp_ratio)
        self.mask_embedding = nn.Parameter(torch.zeros(c.vision_width))
        # masked slots are identical inputs: only a position embedding tells them apart
        self.positions = nn.Parameter(torch.randn(c.n_tokens, c.vision_width) * 0.02)
        self.reconstructor = nn.Sequential(*(Block(c.vision_width, c.heads, c.mlp_ratio) for _ in range(c.depth)))
        self.out = nn.Sequential(nn.LayerNorm(c.vision_width), nn.Linear(c.vision_width, c.vision_width))

    def forward(
        self, features: torch.Tensor, tau: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: -> (reconstruction ``(B, N, d_v)``, keep mask ``(B, N)`` with STE gradient)."""
        x = features.float()
        if x.shape[1] != self.config.n_tokens:
            raise ValueError(f"this autoencoder was built for {self.config.n_tokens} tokens, got {x.shape[1]}")
        logits = self.selector(x)
        # binary Gumbel-Softmax: the difference of two Gumbel draws is logistic noise
        noise = gumbel_noise(logits, generator) - gumbel_noise(logits, generator)
        soft = torch.sigmoid((logits + noise) / tau)
        keep = (soft > 0.5).float() + (soft - soft.detach())  # exactly 0/1 forward, sigmoid gradient
        masked = keep[..., None] * x + (1 - keep[..., None]) * self.mask_embedding
        return self.out(self.reconstructor(masked + self.positions)), keep

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.selector(features)

    def loss(self, features: torch.Tensor, reconstruction: torch.Tensor, keep: torch.Tensor):
        """(total, reconstruction MSE, kept fraction): MSE + max(kept fraction, keep_floor)."""
        mse = F.mse_loss(reconstruction, features.float())
        kept = keep.mean()
        return mse + torch.clamp(kept, min=self.config.keep_floor), mse, kept


# ---------------------------------------------------------------------------------------------
# checkpoints

_CONFIGS = {"autoselect": AutoSelectConfig, "gumbel": GumbelConfig}
_MODULES = {"autoselect": AutoSelect, "gumbel": GumbelAutoencoder}


def build_selector(kind: str, **config: Any) -> nn.Module:
    _check_choice("selector", kind, KINDS)
    return _MODULES[kind](_CONFIGS[kind](**config))


def save_selector(directory: str | Path, module: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` (each replaced atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    _atomic(directory / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": FORMAT}))
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": module.kind,
        "config": asdict(module.config),
        **(extra or {}),
    }
    _atomic(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return directory


def read_config(directory: str | Path, kind: str) -> dict[str, Any]:
    """The validated ``config.json`` record of a ``kind`` checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{kind} checkpoint directory {str(directory)!r} does not exist; {train_hint(kind)}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a {kind} checkpoint: it has no {CONFIG_NAME}; {train_hint(kind)}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {err}); re-train or restore the checkpoint") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a prunebench selector config (no \"format\": \"{FORMAT}\")")
    if record.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {record.get('version')!r}; this prunebench reads {FORMAT_VERSION}")
    if record.get("kind") != kind:
        raise CheckpointError(
            f"{str(directory)!r} holds a {record.get('kind')!r} checkpoint, not {kind!r}; "
            f"use it with the {record.get('kind')!r} method"
        )
    config = record.get("config")
    known = {f.name for f in fields(_CONFIGS[kind])}
    if not isinstance(config, dict) or set(config) - known:
        raise CheckpointError(f"{path}: config must be an object with keys from {sorted(known)}, got {config!r}")
    return record


def load_selector(directory: str | Path, kind: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the ``kind`` module from ``directory`` and load its weights (strictly), in eval mode."""
    directory = Path(directory)
    module = build_from_record(read_config(directory, kind), directory)
    module.load_state_dict(read_weights(directory, module), strict=True)
    return module.to(device).eval()


def build_from_record(record: dict[str, Any], directory: Path) -> nn.Module:
    """The (untrained) module a validated config record describes."""
    try:
        return build_selector(record["kind"], **record["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / CONFIG_NAME}: invalid {record['kind']} config ({err})") from None


def read_weights(directory: Path, module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights file of ``directory``, checked against ``module``'s parameter names and shapes."""
    path = check_weights(directory, module)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({err}); re-train or restore it") from None


def check_weights(directory: Path, module: nn.Module) -> Path:
    """Read only the safetensors header: every tensor present, with the shape the config implies."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} has a config but no {WEIGHTS_NAME}; the checkpoint is incomplete")
    try:
        with safe_open(path, "pt") as handle:
            found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({err}); re-train or restore it") from None
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        shapes = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        raise CheckpointError(
            f"{path} does not match its config.json: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shape {[(n, found[n], expected[n]) for n in shapes[:5]]}"
        )
    return path


def check_vision_width(record: dict[str, Any], width: int, directory: str | Path) -> None:
    trained = record["config"]["vision_width"]
    if trained != width:
        model = record.get("model", "another model")
        raise CheckpointError(
            f"checkpoint {str(directory)!r} was trained on vision features {trained} wide ({model}); this "
            f"model's vision features are {width} wide. Train a selector for this model with "
            f"`prunebench train {record['kind']} --model <this model> ...`"
        )


def shipped_checkpoint(kind: str, variant: str | None = None) -> Path:
    """Where a checkpoint trained for the built-in tiny LLaVA ships: ``<kind>-tiny-llava`` or, for
    AutoSelect, one per budget (``variant`` "k64", ...) and the sampled-K one ("sampled-k")."""
    from prunebench.models.loading import ASSETS

    return ASSETS / (f"{kind}-tiny-llava" + (f"-{variant}" if variant else ""))


# how the per-budget AutoSelect checkpoints shipped for builtin:tiny-llava were trained (--budget K and
# --drop added: 0.5 for K = 192 and 128, 0.75 for K = 64, each the better on a re-drawn evaluation set;
# every checkpoint's config.json records its settings)
SHIPPED_RECIPE = "--model builtin:tiny-llava --data synthetic:4000 --steps 400 --lr 1e-3"


def shipped_budgets(kind: str) -> list[int]:
    """The budgets K with a per-budget checkpoint shipped for builtin:tiny-llava."""
    root = shipped_checkpoint(kind).parent
    prefix = f"{kind}-tiny-llava-k"
    return sorted(int(p.name[len(prefix):]) for p in root.glob(f"{prefix}*")
                  if p.name[len(prefix):].isdigit() and (p / CONFIG_NAME).is_file())


class CheckpointScorer:
    """What a method holds: a checkpoint checked at creation (config and weight header, before any
    model runs), loaded on first use onto the features' device, refused for another vision width."""

    def __init__(self, kind: str, ckpt: str | None, variant: str | None = None):
        self.shipped = not ckpt  # no ckpt: a checkpoint shipped for builtin:tiny-llava
        self.kind, self.directory = kind, Path(ckpt) if ckpt else shipped_checkpoint(kind, variant)
        if self.shipped and not (self.directory / "config.json").is_file():
            raise CheckpointError(
                f"{kind} needs a trained checkpoint: pass {kind}:ckpt=DIR; {train_hint(kind)}. "
                f"(This install lacks the one shipped for builtin:tiny-llava, {self.directory}.)"
            )
        self.record = read_config(self.directory, kind)
        with torch.device("meta"):  # shapes only, no memory
            check_weights(self.directory, build_from_record(self.record, self.directory))
        self._loaded: tuple[tuple[str, int], nn.Module] | None = None

    def files(self) -> list[Path]:
        return [self.directory / CONFIG_NAME, self.directory / WEIGHTS_NAME]

    def module(self, device: torch.device, vision_width: int) -> nn.Module:
        key = (str(device), vision_width)
        if self._loaded is None or self._loaded[0] != key:
            if self.shipped and self.record["config"]["vision_width"] != vision_width:
                raise CheckpointError(
                    f"{self.kind}: without ckpt= it uses the checkpoint shipped for builtin:tiny-llava, which "
                    f"does not fit this model (vision width {vision_width}); pass {self.kind}:ckpt=DIR "
                    f"({train_hint(self.kind)})"
                )
            check_vision_width(self.record, vision_width, self.directory)
            self._loaded = (key, load_selector(self.directory, self.kind, device))
        return self._loaded[1]

    def top_k(self, ctx: StageContext) -> Selection:
        """Hard top-K of the logits on the pre-projector features, per sample (the engine
        restores the original order)."""
        features = ctx.vision_features
        scores = self.module(features.device, features.shape[-1]).scores(features)
        return Selection(keep=[scores[b, :n].topk(k).indices for b, (n, k) in enumerate(zip(ctx.n_visual, ctx.keep))])


# ---------------------------------------------------------------------------------------------
# helpers


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(kw_only=True)
class CheckpointSelector(Method):
    """Base of the learned pre-LLM methods: hard top-K of a trained scorer loaded from ``ckpt``.

    Without ``ckpt`` a checkpoint shipped for builtin:tiny-llava is used: the one of ``variant``
    (None: ``<name>-tiny-llava``), or with ``per_budget`` the one trained at the run's K."""

    stage: ClassVar[str] = "pre"
    ckpt: str | None = None  # checkpoint directory (config.json + model.safetensors); None: the built-in model's
    _scorers: dict[int | None, CheckpointScorer] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def per_budget(self) -> bool:
        return False

    @property
    def variant(self) -> str | None:
        return None

    def __post_init__(self) -> None:
        if self.per_budget:
            if not shipped_budgets(self.name):  # an install without them fails here
                raise self._not_shipped(None)
        else:
            self._scorers[None] = CheckpointScorer(self.name, self.ckpt, self.variant)  # a bad checkpoint fails here

    def scorer(self, k: int | None) -> CheckpointScorer:
        """The scorer for budget ``k``: the one checkpoint, or the one shipped for K = ``k``."""
        if not self.per_budget:
            return self._scorers[None]
        if k not in self._scorers:
            if k not in shipped_budgets(self.name):
                raise self._not_shipped(k)
            self._scorers[k] = CheckpointScorer(self.name, None, f"k{k}")
        return self._scorers[k]

    def _not_shipped(self, k: int | None) -> CheckpointError:
        shipped = shipped_budgets(self.name)
        have = f"they ship for K = {', '.join(map(str, shipped))}" if shipped else "this install has none"
        return CheckpointError(
            f"{self.name}: without ckpt= it uses the checkpoint shipped for builtin:tiny-llava at the run's budget"
            f"{'' if k is None else f' (K = {k})'}; {have}. Train one with `prunebench train {self.name} "
            f"{SHIPPED_RECIPE} --budget {k or 'K'} --drop 0.5 --out DIR` and pass {self.name}:ckpt=DIR, or use "
            f"{self.name}:shipped=sampled-k (one scorer trained for K in 64..192)"
        )

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        stages = super().schedule(n_visual, budget, num_layers)
        if self.per_budget and not budget.is_all:
            self.scorer(stages[0].keep)  # no checkpoint for this K: refused before any work
        return stages

    def input_files(self) -> list[Path]:
        """The checkpoint files behind this method's records: the one checkpoint, or every shipped
        per-budget one (the method's records share one digest)."""
        if not self.per_budget:
            return self._scorers[None].files()
        return [f for k in shipped_budgets(self.name) for f in self.scorer(k).files()]

    def select(self, ctx: StageContext) -> Selection:
        if all(k == n for n, k in zip(ctx.n_visual, ctx.keep)):  # budget all: every token, no scoring
            # still what scoring needs: per-token vision features this checkpoint fits (the pre-run probe)
            width = ctx.vision_features.shape[-1]
            budgets = shipped_budgets(self.name) if self.per_budget else [None]
            self.scorer(budgets[0]).module(ctx.hidden.device, width)
            return Selection(keep=[torch.arange(n, device=ctx.hidden.device) for n in ctx.n_visual])
        if self.per_budget and len(set(ctx.keep)) > 1:
            raise MethodError(f"{self.name}: the shipped per-budget checkpoints need one K per batch, got {ctx.keep}")
        return self.scorer(ctx.keep[0] if self.per_budget else None).top_k(ctx)
