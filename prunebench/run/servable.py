"""Which methods a model can serve, found before any cell runs.

A method may need a signal the backbone does not have (VisionZip: the vision tower's CLS
attention; AutoSelect, Gumbel: pre-projector features per visual token). Each method runs one
prefill on one blank image with every visual token kept (so no budget can be refused), reusing
one vision pass; a missing signal raises :class:`SignalUnavailableError` there.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from prunebench.budget import Budget
from prunebench.engine.generate import DecodeConfig, PruningEngine
from prunebench.engine.method import Method, MethodError
from prunebench.engine.signals import SignalUnavailableError

PROBE_QUESTION = "<image>\nwhat is in the image ?"


def servable_methods(methods: list[Method], engine: PruningEngine, processor, model_name: str, listed: bool,
                     note: Callable[[str], None]) -> list[Method]:
    """``methods`` that run on this model. One the user listed (``listed``) and the model cannot
    serve is an error naming the reason, before any work; from the default list it is left out
    and ``note`` says why."""
    from prunebench.run.lmms_bridge import PrunedVLM

    bridge = PrunedVLM(engine, processor, None, Budget.all())
    inputs = bridge._encode([bridge._prompt(PROBE_QUESTION)], [Image.new("RGB", (64, 64), (128, 128, 128))])
    image_inputs = engine.adapter.image_inputs(inputs)
    images = engine.encode_images(inputs["pixel_values"], image_inputs=image_inputs)
    kept = []
    for method in methods:
        try:
            engine.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], method=method,
                            budget=Budget.all(), decode=DecodeConfig(max_new_tokens=1), image_inputs=image_inputs,
                            images=images)
        except SignalUnavailableError as err:
            if listed:
                raise MethodError(f"method {method.spec()!r} cannot run on {model_name}: {err}") from None
            note(f"skipped {method.spec()} (not servable on {model_name}): {err}")
            continue
        kept.append(method)
    return kept
