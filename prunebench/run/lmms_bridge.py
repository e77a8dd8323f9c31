"""The lmms-eval model: one (method, budget) on the pruning engine, as lmms-eval's ``lmms``.

lmms-eval 0.7.3 does not find a class by ``@register_model`` alone, so the harness passes a
constructed object to ``simple_evaluate(model=...)``. Unlike lmms-eval's own llava_hf wrapper,
an exception is never turned into an empty answer: it propagates and the cell fails loudly.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from prunebench.models.backbones import QWEN_IMAGE, QwenVLInputs
from prunebench.budget import Budget, BudgetError
from prunebench.engine.generate import DecodeConfig, EncodedImages, PruningEngine
from prunebench.engine.method import Method
from prunebench.engine.timing import StageClock
from prunebench.errors import UserError

IMAGE_TOKEN = "<image>"  # lmms-eval's own placeholder in a context, and LLaVA's


@dataclass
class Batch:
    """One batch of questions as the model sees it before any pruning, kept for the run's later cells."""

    inputs: dict[str, torch.Tensor]
    images: EncodedImages
    vision_ms: float  # what encoding ``images`` took when it was measured

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + sum(t.nbytes for t in self.inputs.values())


class RunCache:
    """What every cell of a run computes identically, computed once.

    - ``prompt_ids``: each expanded prompt's token ids (every cell asks the same questions).
    - batches of one task, keyed by their questions: the processor's output and the vision side's
      (tower and projector), which depend on the pixels only. A later cell reuses them and reports
      the vision time measured when they were computed, so records keep a real vision time while
      the tower runs once per image instead of once per cell. Up to ``max_bytes``; once full, new
      batches are not kept (cells sweep the same batches in order, so keeping the first ones is
      what pays). Only one task is kept at a time: the harness runs a task's cells together.
    """

    def __init__(self, max_bytes: int = 0):
        self.prompt_ids: dict[str, torch.Tensor] = {}
        self.max_bytes = max_bytes
        self._task: str | None = None
        self._batches: dict[tuple, Batch] = {}
        self._bytes = 0
        self.hits = 0

    def start_task(self, task: str) -> None:
        if task != self._task:
            self._task, self._batches, self._bytes = task, {}, 0

    def get(self, key: tuple) -> Batch | None:
        batch = self._batches.get(key)
        self.hits += batch is not None
        return batch

    def put(self, key: tuple, batch: Batch) -> None:
        if self._bytes + batch.nbytes <= self.max_bytes:
            self._batches[key] = batch
            self._bytes += batch.nbytes


def build_prompt(processor, context: str) -> str:
    """The model's chat template around the image and the question when the processor has one;
    otherwise LLaVA-1.5's conversation format with the model's own image placeholder."""
    text = context if IMAGE_TOKEN in context else f"{IMAGE_TOKEN}\n{context}"
    template = getattr(processor, "chat_template", None)
    if template:
        question = text.replace(IMAGE_TOKEN, "").lstrip("\n")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    # Qwen-VL's image block is <|vision_start|><|image_pad|><|vision_end|>; LLaVA's is <image>
    placeholder = QWEN_IMAGE if isinstance(processor, QwenVLInputs) else IMAGE_TOKEN
    return f"USER: {text.replace(IMAGE_TOKEN, placeholder)} ASSISTANT:"


class PromptError(UserError, ValueError):
    """A prompt the model cannot take: longer than its positions, or with no question."""


def check_prompt_length(length: int, max_positions: int | None, where: str) -> None:
    if max_positions is not None and length > max_positions:
        raise PromptError(
            f"{where}: the prompt is {length} tokens (image tokens included), more than the model's "
            f"{max_positions} positions; shorten the question or drop the sample"
        )


@dataclass
class SampleStats:
    """What the engine measured for one sample (timings are the batch's, divided by its size)."""

    n_visual: int  # visual tokens of the image before pruning
    visual_tokens: list[int]  # entering each decoder layer
    new_tokens: int
    timing: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0  # the prompt's tokens, its visual ones before pruning included


class PrunedVLM(lmms):
    def __init__(
        self,
        engine: PruningEngine,
        processor,
        method: Method | None,
        budget: Budget,
        batch_size: int = 1,
        max_new_tokens: int | None = None,
        on_progress: Callable[[int], None] | None = None,
        on_requests: Callable[[int], None] | None = None,
        cache: RunCache | None = None,
    ):
        super().__init__()
        self.cache = cache or RunCache()  # the harness shares one across a run's cells
        self.engine = engine
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.method = method
        self.budget = budget
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens  # a cap over the task's own value
        self.on_progress = on_progress or (lambda n: None)  # n requests finished
        self.on_requests = on_requests or (lambda n: None)  # n requests to come
        self.stats: dict[tuple[str, int], SampleStats] = {}

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # -- lmms-eval entry points ---------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        self.on_requests(len(requests))
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        for indices in groups.values():
            # similar lengths together: less padding (answers do not depend on the batch)
            indices.sort(key=lambda i: len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._generate([requests[i] for i in chunk])
                for i, text in zip(chunk, texts):
                    answers[i] = text
                self.on_progress(len(chunk))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        self.on_requests(len(requests))
        out = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            if callable(continuation):
                continuation = continuation(doc)
            out.append(self._loglikelihood(context, str(continuation), self._image(doc_to_visual, doc, task), task, doc_id))
            self.on_progress(1)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("prunebench does not run multi-round tasks yet; choose a single-turn task")

    # -- helpers ------------------------------------------------------------------------------
    def _generate(self, requests: list[Instance]) -> list[str]:
        contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*(r.args for r in requests))
        key = (tasks, splits, doc_ids, contexts)
        kept = None if self.resizes else self.cache.get(key)  # a resized image is another input
        originals, budget = None, self.budget
        if kept is None:
            images = [
                self._image(fn, self.task_dict[task][split][doc_id], task)
                for fn, doc_id, task, split in zip(doc_to_visual, doc_ids, tasks, splits)
            ]
            if self.resizes:
                images, originals, budget = self._resized(images, tasks, doc_ids)
            inputs = self._encode([self._prompt(c) for c in contexts], images)
        else:
            inputs = kept.inputs
        for task, doc_id, length in zip(tasks, doc_ids, inputs["attention_mask"].sum(-1).tolist()):
            check_prompt_length(length, self.engine.adapter.max_positions, f"{task} doc {doc_id}")
        decode = self._decode_config(dict(gen_kwargs[0]))
        clock = StageClock(self.engine.device)
        with self._naming_samples(inputs, tasks, doc_ids):
            gen = self.engine.generate(
                inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                method=self.method, budget=budget, decode=decode, clock=clock,
                image_inputs=self.engine.adapter.image_inputs(inputs), images=kept and kept.images,
                return_images=kept is None and self.cache.max_bytes > 0 and not self.resizes,
            )
        timings = gen.timings
        if kept is not None:
            timings = {**timings, "vision": kept.vision_ms}
        elif gen.images is not None:
            self.cache.put(key, Batch(inputs, gen.images, timings["vision"]))
        self._record(inputs, timings, gen.visual_tokens, [len(t) for t in gen.tokens], tasks, doc_ids, originals)
        return gen.texts

    def _loglikelihood(self, context: str, continuation: str, image: Image.Image, task: str, doc_id: int):
        prompt = self._prompt(context)
        originals, budget = None, self.budget
        if self.resizes:
            (image,), originals, budget = self._resized([image], [task], [doc_id])
        inputs = self._encode([prompt], [image])
        target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if target.numel() == 0:
            raise PromptError(f"{task} doc {doc_id}: empty continuation {continuation!r}; the task gives nothing to score")
        length = int(inputs["attention_mask"].sum()) + len(target) - 1
        check_prompt_length(length, self.engine.adapter.max_positions, f"{task} doc {doc_id} (with its continuation)")
        clock = StageClock(self.engine.device)
        with self._naming_samples(inputs, [task], [doc_id]):
            logprobs, greedy, visual_tokens = self.engine.score_continuation(
                inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], target.to(self.engine.device),
                method=self.method, budget=budget, clock=clock,
                image_inputs=self.engine.adapter.image_inputs(inputs),
            )
        self._record(inputs, clock.summary(), visual_tokens, [len(target)], [task], [doc_id], originals)
        return float(logprobs.sum()), bool(greedy)

    @property
    def resizes(self) -> bool:
        """Whether the method acts on the image before the processor (``Method.resize_image``)."""
        return self.method is not None and self.method.resizes_images and not self.budget.is_all

    def _resized(self, images: list[Image.Image], tasks, doc_ids) -> tuple[list[Image.Image], list[int], Budget]:
        """The images the method makes of them at this budget, the originals' visual-token counts, and
        the budget the engine then runs at (all: the resized image is the pruning)."""
        tokens_at = visual_tokens_at(self.processor)
        out = []
        for image, task, doc_id in zip(images, tasks, doc_ids):
            try:
                out.append(self.method.resize_image(image, self.budget, tokens_at))
            except BudgetError as err:
                raise BudgetError(f"{task} doc {doc_id} ({image.height}x{image.width} px): {err}") from None
        return out, [tokens_at(image.height, image.width) for image in images], Budget.all()

    def _image(self, doc_to_visual, doc, task: str) -> Image.Image:
        visuals = doc_to_visual(doc)
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            raise NotImplementedError(
                f"task {task!r} gives {len(visuals)} visual(s) per question; prunebench runs single-image "
                "tasks for now"
            )
        return visuals[0].convert("RGB")

    def _prompt(self, context: str) -> str:
        return build_prompt(self.processor, context)

    def _encode(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Token ids, pixels (in the model's dtype) and the extra image inputs the backbone needs
        (``image_sizes``, ``image_grid_thw``), on the engine's device."""
        self.tokenizer.padding_side = "left"
        if type(self.processor).__name__ == "LlavaProcessor":
            inputs = self._encode_llava(prompts, images)
        else:
            inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        dtype = next(self.engine.model.parameters()).dtype
        device = self.engine.device
        return {
            "input_ids": inputs["input_ids"].to(device),
            "attention_mask": inputs["attention_mask"].to(device),
            "pixel_values": inputs["pixel_values"].to(device, dtype),
            **{key: value.to(device) for key, value in self.engine.adapter.image_inputs(inputs).items()},
        }

    def _encode_llava(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """What LlavaProcessor returns (left-padded), with each prompt tokenized once per run: every
        cell asks the same questions, and tokenizing 576 image placeholders took ~0.5 s a cell."""
        processor = self.processor
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        counts = processor._get_num_multimodal_tokens(image_sizes=[image.size[::-1] for image in images]).num_image_tokens
        rows = []
        for prompt, count in zip(prompts, counts):
            text = prompt.replace(processor.image_token, processor.image_token * count)
            ids = self.cache.prompt_ids
            if text not in ids:  # a tensor: 8 bytes a token, not a list of int objects
                ids[text] = torch.tensor(self.tokenizer(text)["input_ids"])
            rows.append(ids[text])
        width = max(len(r) for r in rows)
        return {
            "input_ids": torch.stack([F.pad(r, (width - len(r), 0), value=self.tokenizer.pad_token_id) for r in rows]),
            "attention_mask": torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows]),
            "pixel_values": pixel_values,
        }

    def clean(self) -> None:
        """lmms-eval calls this after each task to free a model it will not use again; this engine
        serves every cell of the run, and the full gc.collect() it adds cost ~0.25 s a cell."""

    @contextmanager
    def _naming_samples(self, inputs, tasks, doc_ids):
        """A budget an image cannot meet (K above its visual tokens, on backbones whose count
        varies per image) fails naming the samples of the batch and their visual-token counts."""
        try:
            yield
        except BudgetError as err:
            counts = (inputs["input_ids"] == self.engine.adapter.image_token_id).sum(-1).tolist()
            where = ", ".join(f"{task} doc {doc} ({n} visual tokens)" for task, doc, n in zip(tasks, doc_ids, counts))
            raise BudgetError(f"{where}: {err}") from None

    def _decode_config(self, kwargs: dict) -> DecodeConfig:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(kwargs.get("num_beams", 1) or 1) > 1:
            raise NotImplementedError("beam search is not supported by the pruning engine; use num_beams=1")
        temperature = float(kwargs.get("temperature", 0) or 0)
        return DecodeConfig(
            max_new_tokens=min(int(kwargs.get("max_new_tokens", 128)), self.max_new_tokens or 1 << 30),
            do_sample=bool(kwargs.get("do_sample", False)) and temperature > 0,
            temperature=temperature or 1.0,
            top_p=float(kwargs.get("top_p", 1.0) or 1.0),
            eos_token_id=self.tokenizer.eos_token_id,
            stop=tuple(s for s in until if s),
        )

    def _record(self, inputs, timings: dict[str, float], visual_tokens: torch.Tensor, new_tokens: list[int], tasks, doc_ids,
                n_visual: list[int] | None = None) -> None:
        """``n_visual``: the images' visual tokens before pruning, when the inputs hold resized images."""
        share = {k: v / len(doc_ids) for k, v in timings.items()}
        if n_visual is None:
            n_visual = (inputs["input_ids"] == self.engine.adapter.image_token_id).sum(-1).tolist()
        prompt = inputs["attention_mask"].sum(-1).tolist()
        for b, (task, doc_id) in enumerate(zip(tasks, doc_ids)):
            self.stats[(task, doc_id)] = SampleStats(n_visual[b], visual_tokens[b].tolist(), new_tokens[b], share,
                                                     prompt[b])


def visual_tokens_at(processor) -> Callable[[int, int], int]:
    """``tokens(height, width)``: the visual tokens the processor gives one image of that size."""
    image_processor = processor.image_processor
    merge = getattr(image_processor, "merge_size", None)
    if merge is not None:  # Qwen-VL: patches of the smart-resized image, 2x2 merged
        return lambda height, width: image_processor.get_number_of_image_patches(height, width, {}) // merge**2
    return lambda height, width: processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0]
