"""The method interface and its registry.

A method is a small dataclass: its fields are its options (with types and defaults), ``stage``
says where it acts, :meth:`Method.schedule` says how many visual tokens survive each stage, and
:meth:`Method.select` picks them from the signals the engine offers. It never touches model code.

    @register_method
    @dataclass(kw_only=True)
    class Mine(Method):
        '''One line shown by `prunebench list`.'''
        name: ClassVar[str] = "mine"
        stage: ClassVar[str] = "llm"
        layer: int = 2

        def select(self, ctx):
            scores = ctx.attention(self.layer - 1, rows="last", visual_only=True).mean(1)[:, 0]
            return Selection(keep=scores.topk(ctx.uniform_keep, dim=-1).indices)

Options come from the command line as ``mine:layer=3,positions=original``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import itertools
import pkgutil
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from prunebench.budget import Budget
from prunebench.engine.sequence import PositionPolicy
from prunebench.errors import MethodError

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

    from prunebench.engine.signals import StageContext

PRE_LLM = None  # Stage.layer of the pre-LLM stage: after the projector, before decoder layer 0


@dataclass(frozen=True)
class Stage:
    """One pruning point: before decoder layer ``layer`` (``None``: pre-LLM), keep ``keep`` tokens."""

    layer: int | None
    keep: int


@dataclass
class Selection:
    """What a method returns at a stage.

    ``keep``: indices into the sample's current visual tokens (0..n-1), one row per sample
    (a ``(B, k)`` tensor, or a list of 1-D tensors when counts differ); any order, the engine
    restores the original order. ``merged``: optional ``(B, m, D)`` tokens the method built
    (e.g. VisionZip's contextual tokens), placed after the kept visual tokens; ``leading``:
    the same, placed before them (e.g. VisionZip's CLS token).
    """

    keep: torch.Tensor | list[torch.Tensor]
    merged: torch.Tensor | None = None
    leading: torch.Tensor | None = None


@dataclass(kw_only=True)
class Method:
    """Base class: subclasses are dataclasses whose fields are their options."""

    name: ClassVar[str]
    stage: ClassVar[Literal["pre", "llm", "none"]]
    layer: ClassVar[int | None] = None  # overridden by a field in in-LLM methods
    positions: PositionPolicy = "reindex"

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        """Stages for one image of ``n_visual`` tokens on a decoder of ``num_layers`` layers (a
        multi-stage method averages its budget over them). Default: one stage at ``self.layer``."""
        keep = budget.resolve(n_visual)
        return [Stage(PRE_LLM if self.stage == "pre" else self.layer, keep)]

    def floor_schedule(self, n_visual: int, num_layers: int) -> list[Stage]:
        """The floor control (budget ``floor``): the stages of budget ``all``, each in-LLM one
        keeping a single token (the method's top pick), so only the layers before the first stage
        see the image. Methods whose smallest K keeps more (DART's pivots) or that need a pre-LLM
        stage at every budget (SparseVLM's raters) override it."""
        if self.stage != "llm":
            raise MethodError(
                f"{self.name}: the floor budget is a control for in-LLM methods (one visual token after each "
                f"stage); a pre-LLM method at one token is budget 1"
            )
        stages = self.schedule(n_visual, Budget.all(), num_layers)
        return [stage if stage.layer is PRE_LLM else Stage(stage.layer, 1) for stage in stages]

    def stages(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        """What the engine runs: :meth:`floor_schedule` for the floor budget, else :meth:`schedule`."""
        if budget.floor:
            return self.floor_schedule(n_visual, num_layers)
        return self.schedule(n_visual, budget, num_layers)

    def select(self, ctx: StageContext) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError(f"method {self.name!r} does not implement select()")

    def input_files(self) -> list[Path]:
        """Files whose contents change what this method selects (a checkpoint): their digest is
        part of a record's key, so retraining in place recomputes the cell. Default: none."""
        return []

    @property
    def resizes_images(self) -> bool:
        """Whether the method acts before the processor, through :meth:`resize_image`."""
        return False

    def resize_image(self, image: Image.Image, budget: Budget, tokens_at: Callable[[int, int], int]) -> Image.Image:
        """For a method that ``resizes_images``: the image the model should see instead of ``image``
        at ``budget``; ``tokens_at(height, width)`` is the visual-token count the model's processor
        gives an image of that size. The caller (prunebench run) encodes the returned image and runs
        the engine with budget ``all``."""
        raise NotImplementedError(f"method {self.name!r} does not resize images")

    # -- description -------------------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    def spec(self) -> str:
        """Canonical ``name:opt=v`` string with the non-default options, for results and caching."""
        changed = [
            f"{f.name}={_format_value(getattr(self, f.name))}"
            for f in self.options()
            if getattr(self, f.name) != f.default
        ]
        return self.name + (":" + ",".join(sorted(changed)) if changed else "")


# ---------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[Method]] = {}
_DISCOVERED = False
ENTRY_POINT_GROUP = "prunebench.methods"


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` creatable by ``cls.name``."""
    if "__dataclass_fields__" not in vars(cls):  # decorated itself, not just inheriting
        raise TypeError(f"{cls.__name__} must be a dataclass (its fields are its options)")
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.stage not in ("pre", "llm", "none"):
        raise TypeError(f"{cls.__name__}.stage must be 'pre', 'llm' or 'none', not {cls.stage!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise MethodError(f"method name {name!r} is already registered by {existing.__module__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Import every module of prunebench.methods, then plug-ins declared as entry points."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = importlib.import_module("prunebench.methods")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"prunebench.methods.{info.name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def available_methods() -> dict[str, type[Method]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise MethodError(f"unknown method {name!r}; valid choices: {', '.join(methods)}")
    return methods[name]


def create_method(spec: str | type[Method], **options: Any) -> Method:
    """Create a method from ``"name"`` or ``"name:opt=v,opt2=v"``; keyword options override."""
    if isinstance(spec, type):
        cls, parsed = spec, {}
    else:
        name, colon, opts = spec.partition(":")
        cls = get_method_class(name.strip())
        if colon and not opts.strip():
            raise MethodError(f"method {spec!r}: no options after ':'; write {cls.name}:key=value "
                              f"(options: {_describe_options(cls)}) or just {cls.name}")
        parsed = _parse_options(cls, opts)
    parsed.update({k: _coerce(cls, k, v) for k, v in options.items()})
    return cls(**parsed)


def parse_method_list(text: str) -> list[str]:
    """Split ``"a,b:x=1,y=2,c"`` into method specs ``["a", "b:x=1,y=2", "c"]``.

    A comma-separated item holding ``=`` but no ``:`` continues the previous method's options.
    """
    specs: list[str] = []
    if not text.strip():
        raise MethodError("no method given; valid choices: " + ", ".join(available_methods()))
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise MethodError(f"empty item in the method list {text!r} (two commas in a row, or one at an end); "
                              "write name:key=value,key=value,name2")
        if "=" in item and ":" not in item:
            if not specs:
                raise MethodError(f"option {item!r} comes before any method name in {text!r}")
            specs[-1] += ("," if ":" in specs[-1] else ":") + item
        else:
            specs.append(item)
    if not specs:
        raise MethodError("no method given; valid choices: " + ", ".join(available_methods()))
    return specs


def _parse_options(cls: type[Method], text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in (p.strip() for p in text.split(",")) if text else ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise MethodError(
                f"malformed option {item!r} for method {cls.name!r}: write key=value "
                f"(options: {_describe_options(cls)})"
            )
        out[key.strip()] = _coerce(cls, key.strip(), value.strip())
    return out


def check_stages(method: Method, stages: list[Stage], n_visual: int, num_layers: int) -> None:
    """A schedule the engine can run for one image of ``n_visual`` tokens: stage layers strictly
    increasing and inside the decoder, each stage keeping 0..n tokens (0: the stage builds every
    token the LLM sees, see Selection.merged), never more than before."""
    order = [-1 if s.layer is None else s.layer for s in stages]
    if order != sorted(set(order)) or (order and order[0] < -1):
        raise MethodError(f"method {method.name!r}: stage layers must be strictly increasing decoder layers, "
                          f"got {[s.layer for s in stages]}")
    if order and order[-1] >= num_layers:
        raise MethodError(
            f"method {method.name!r} prunes at layer {order[-1]}, but the model has "
            f"{num_layers} decoder layers (valid: 0..{num_layers - 1})"
        )
    counts = [n_visual] + [s.keep for s in stages]
    if any(k < 0 for k in counts[1:]) or any(a < b for a, b in itertools.pairwise(counts)):
        raise MethodError(f"method {method.name!r}: schedule {stages} for {n_visual} tokens must keep 0..{n_visual}, "
                          "non-increasing")


def _describe_options(cls: type[Method]) -> str:
    return ", ".join(f"{f.name}={_format_value(f.default)}" for f in cls.options()) or "none"


def _coerce(cls: type[Method], key: str, value: Any) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in cls.options()}
    if key not in fields:
        raise MethodError(
            f"method {cls.name!r} has no option {key!r}; its options: {_describe_options(cls)}"
        )
    try:
        return _convert(hints[key], value)
    except (TypeError, ValueError) as err:
        raise MethodError(f"option {cls.name}:{key}={value!r}: {err}") from None


def _convert(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        none_given = value is None or (isinstance(value, str) and value.lower() == "none")
        if none_given and len(args) < len(typing.get_args(tp)):  # Optional[...]
            return None
        errors = []
        for arg in args:
            try:
                return _convert(arg, value)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        items = value.split("/") if isinstance(value, str) else list(value)
        return tuple(_convert(item_tp, v) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported option type {tp!r}")


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(map(str, value))
    return str(value)
