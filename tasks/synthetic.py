"""The built-in benchmark's world: coloured shapes and small printed text, drawn in code.

Three lmms-eval tasks ask about it, each mirroring a real benchmark's skill:

- ``synth-gqa``: colour / shape of an object named by the other attribute, left-or-right of two
  objects, count of a shape (GQA's exact match);
- ``synth-textvqa``: read a two-digit number or a three-letter word printed small (4 px high on a
  96 px image) among shapes (exact match);
- ``synth-pope``: balanced yes/no existence of a coloured shape, half of the absent ones sharing a
  colour or shape with a present one (POPE's metrics).

Everything sits on the 4-px patch grid of the tiny model: a shape is 2 x 2 patches (each patch
holds one of its corners), a printed character is one patch (3 x 4-px glyphs). So every answer
lives in a few of the 576 patches (4 for an object, 2-3 for a string) and pruning that drops them
loses it, while one patch alone tells what it shows, so a tiny tower learns to see in minutes. The built-in tiny LLaVA is trained on the same
world drawn from a separate seed stream (``training_example``). Every sample is a pure function
of (stream, seed, index): the same arguments give the same bytes on any machine (no fonts: glyphs
are bitmaps below).
"""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 96  # pixels; with the tiny model's 4-px patches: 24 x 24 = 576 visual tokens (LLaVA-1.5's count)
PATCH = 4
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (225, 195, 30),
           "purple": (135, 55, 170), "orange": (235, 125, 25)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "car", "bus", "box", "cup", "hat", "pen", "key", "map", "egg", "fox", "owl",
         "bee", "cow", "pig", "bat", "ant", "jar")
NUMBERS = tuple(str(n) for n in range(10, 100))
COUNT_WORDS = ("0", "1", "2", "3", "4", "5")
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # lmms-eval's default for GQA/TextVQA/POPE

# 3 x 4 bitmap glyphs, rows top to bottom ("#" = ink): one character per 4-px patch
FONT = {
    "0": "### #.# #.# ###", "1": ".#. ##. .#. ###", "2": "### ..# ### ###", "3": "### ..# .## ###",
    "4": "#.# #.# ### ..#", "5": "### #.. ### ###", "6": "#.. ### #.# ###", "7": "### ..# .#. .#.",
    "8": "### #.# ### ###", "9": "### #.# ### ..#", "a": ".#. #.# ### #.#", "b": "##. #.# ##. ##.",
    "c": "### #.. #.. ###", "d": "##. #.# #.# ##.", "e": "### #.. ##. ###", "f": "### #.. ##. #..",
    "g": "### #.. #.# ###", "h": "#.# #.# ### #.#", "i": "### .#. .#. ###", "j": "..# ..# ..# ###",
    "k": "#.# ##. #.. #.#", "l": "#.. #.. #.. ###", "m": "#.# ### ### #.#", "n": "##. #.# #.# #.#",
    "o": "... ### #.# ###", "p": "### #.# ### #..", "q": "### #.# #.# ..#", "r": "##. #.# ##. #.#",
    "s": ".## #.. ..# ##.", "t": "### .#. .#. .#.", "u": "#.# #.# #.# ###", "v": "#.# #.# #.# .#.",
    "w": "#.# #.# ### ###", "x": "#.# #.# .#. #.#", "y": "#.# #.# .#. .#.", "z": "### ..# .#. ###",
}
CHARACTERS = tuple(FONT)


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Text:
    string: str
    x: int
    y: int
    ink: tuple[int, int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + len(self.string) * PATCH - 1, self.y + PATCH - 1


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    text: Text | None = None
    clutter: tuple[Text, ...] = ()  # more printed strings (vision pretraining scenes only)

    @property
    def texts(self) -> tuple[Text, ...]:
        return ((self.text,) if self.text is not None else ()) + self.clutter

    def count(self, shape: str) -> int:
        return sum(s.shape == shape for s in self.shapes)


@dataclass
class Sample:
    scene: Scene
    question: str
    answer: str
    kind: str
    extra: dict = field(default_factory=dict)


def rng_for(stream: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{stream}:{seed}:{index}")


def _free(box, taken, gap: int = 2) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + gap < a or a1 + gap < x0 or y1 + gap < b or b1 + gap < y0 for a, b, a1, b1 in taken)


def _place(rng: random.Random, width: int, height: int, taken: list) -> tuple[int, int, int, int] | None:
    """A free box on the patch grid (so a patch holds one character or one corner of a shape)."""
    for _ in range(200):
        x, y = PATCH * rng.randint(0, (SIZE - width) // PATCH), PATCH * rng.randint(0, (SIZE - height) // PATCH)
        box = (x, y, x + width - 1, y + height - 1)
        if _free(box, taken):
            return box
    return None


def sample_scene(rng: random.Random, n_shapes: int, text: str | None = None) -> Scene:
    """``n_shapes`` shapes (2 x 2 patches each) with distinct (colour, shape) pairs, and optionally
    ``text`` printed one character per patch."""
    background = tuple(rng.randint(205, 250) for _ in range(3))
    taken: list = []
    placed_text = None
    if text is not None:
        box = _place(rng, len(text) * PATCH, PATCH, taken)
        taken.append(box)
        placed_text = Text(text, box[0], box[1], tuple(rng.randint(0, 60) for _ in range(3)))
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n_shapes)
    shapes = []
    for colour, shape in pairs:
        box = _place(rng, 2 * PATCH, 2 * PATCH, taken)
        if box is None:  # the canvas is full: fewer shapes
            break
        taken.append(box)
        shapes.append(Shape(colour, shape, box))
    return Scene(background, tuple(shapes), placed_text)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    x0, y0, x1, y1 = box = (shape.box[0] + 1, shape.box[1] + 1, shape.box[2] - 1, shape.box[3] - 1)  # 1-px margin
    if shape.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _glyph_pixels(text: Text):
    """(char index, x, y) of every inked pixel of the printed string."""
    for i, char in enumerate(text.string):
        for r, row in enumerate(FONT[char].split()):
            for c, ink in enumerate(row):
                if ink == "#":
                    yield i, text.x + i * PATCH + c, text.y + r


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, COLOURS[shape.colour])
    pixels = image.load()
    for text in scene.texts:
        for _, x, y in _glyph_pixels(text):
            pixels[x, y] = text.ink
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- per-patch ground truth (the vision tower's auxiliary targets in training) --------------------
PATCH_LABELS = {  # name -> number of classes (0 = background / not applicable)
    "colour": 1 + len(COLOURS) + 1,  # the last class is ink (printed text)
    "shape": 1 + len(SHAPES) + 1,  # the last class is text
    "char": 1 + len(CHARACTERS),
    # what a question would answer from the patch: the whole printed string (a number or a word)
    # at each of its characters, and at each corner of a shape how many shapes of its kind the
    # image holds. Both need context beyond the patch, which the tower's attention gathers.
    "string": 1 + len(NUMBERS) + len(WORDS),
    "count": 1 + 10,
}
STRINGS = NUMBERS + WORDS


@functools.lru_cache(maxsize=512)  # training asks for one scene's owners several times per step
def patch_owners(scene: Scene, min_pixels: int = 2) -> np.ndarray:
    """For each of the 24 x 24 patches, what covers most of it (at least ``min_pixels`` pixels):
    0 nothing, ``i + 1`` the shape ``scene.shapes[i]``, ``100 + 10 t + k`` character ``k`` of the
    printed string ``scene.texts[t]``. Read-only: the array is shared between calls."""
    owner = Image.new("I", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(owner)
    for i, shape in enumerate(scene.shapes):
        _draw_shape(draw, shape, i + 1)
    ids = np.array(owner, dtype=np.int64)
    for t, text in enumerate(scene.texts):
        for char, x, y in _glyph_pixels(text):
            ids[y, x] = 100 + 10 * t + char
    grid = SIZE // PATCH
    blocks = ids.reshape(grid, PATCH, grid, PATCH).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    owners = np.unique(ids[ids > 0])
    if len(owners) == 0:
        out = np.zeros((grid, grid), dtype=np.int64)
    else:
        pixels = (blocks[None] == owners[:, None, None, None]).sum(-1)  # (owners, grid, grid)
        best = owners[pixels.argmax(0)]  # the owner covering most of each patch (ties: the smallest id)
        out = np.where(pixels.max(0) >= min_pixels, best, 0)
    out.setflags(write=False)
    return out


def string_starts(scene: Scene) -> np.ndarray:
    """For each of the 24 x 24 patches: 1 on the first character of a printed string, 0 on its
    other characters, -1 elsewhere. A string's characters sit in adjacent columns, so their order
    is a difference of one column: marking the first one tells "47" from "74"."""
    owner = patch_owners(scene)
    return np.where(owner >= 100, ((owner - 100) % 10 == 0).astype(np.int64), -1)


def patch_labels(scene: Scene, min_pixels: int = 2) -> dict[str, np.ndarray]:
    """For each of the 24 x 24 patches: the labels of what covers most of it (``patch_owners``)."""
    patch_owner = patch_owners(scene, min_pixels)
    owners = np.unique(patch_owner[patch_owner > 0])
    labels = {name: np.zeros(patch_owner.shape, dtype=np.int64) for name in PATCH_LABELS}
    if len(owners) == 0:
        return labels
    table = {name: np.zeros(len(owners) + 1, dtype=np.int64) for name in PATCH_LABELS}  # labels of each owner
    for o, owner_id in enumerate(owners.tolist(), start=1):
        if owner_id >= 100:
            t, k = divmod(owner_id - 100, 10)
            string = scene.texts[t].string
            row = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "char": CHARACTERS.index(string[k]) + 1,
                   "string": STRINGS.index(string) + 1 if string in STRINGS else 0}
        else:
            shape = scene.shapes[owner_id - 1]
            row = {"colour": list(COLOURS).index(shape.colour) + 1, "shape": SHAPES.index(shape.shape) + 1,
                   "count": min(scene.count(shape.shape), PATCH_LABELS["count"] - 1)}
        for name, value in row.items():
            table[name][o] = value
    index = np.searchsorted(owners, patch_owner) + 1  # row of each patch's owner in ``table``
    index[patch_owner == 0] = 0
    for name in PATCH_LABELS:
        labels[name] = table[name][index]
    return labels


# -- questions ------------------------------------------------------------------------------------
GQA_KINDS = ("colour", "shape", "relation", "count")


def gqa_questions(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every well-posed GQA-style question about ``scene``, by kind."""
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in GQA_KINDS}
    for s in scene.shapes:
        if scene.count(s.shape) == 1:
            out["colour"].append((f"What color is the {s.shape}?", s.colour))
        if sum(o.colour == s.colour for o in scene.shapes) == 1:
            out["shape"].append((f"What shape is the {s.colour} object?", s.shape))
    for a in scene.shapes:
        for b in scene.shapes:
            if abs(a.centre_x - b.centre_x) >= 10:
                side = "left" if a.centre_x < b.centre_x else "right"
                out["relation"].append(
                    (f"Is the {a.colour} {a.shape} to the left or right of the {b.colour} {b.shape}?", side))
    for shape in SHAPES:
        out["count"].append((f"How many {shape}s are there?", str(scene.count(shape))))
    return out


def text_question(scene: Scene) -> tuple[str, str]:
    return "What is written in the image?", scene.text.string


def pope_question(scene: Scene, rng: random.Random, present: bool) -> tuple[str, str, str]:
    """(question, yes/no, category): absent objects share a colour or shape with a present one half
    of the time ("adversarial"), else are any absent pair ("random")."""
    if present:
        s = rng.choice(scene.shapes)
        return _exists(s.colour, s.shape), "yes", "present"
    here = {(s.colour, s.shape) for s in scene.shapes}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in here]
    near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in here)]
    category = "adversarial" if near and rng.random() < 0.5 else "random"
    colour, shape = rng.choice(near if category == "adversarial" else absent)
    return _exists(colour, shape), "no", category


def _exists(colour: str, shape: str) -> str:
    return f"Is there {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} in the image?"


def _random_text(rng: random.Random, numbers: float = 0.5) -> str:
    """A number with probability ``numbers``, else a word."""
    return rng.choice(NUMBERS) if rng.random() < numbers else rng.choice(WORDS)


def task_sample(task: str, seed: int, index: int) -> Sample:
    """The ``index``-th evaluation sample of a built-in task (stream ``eval-<task>``)."""
    rng = rng_for(f"eval-{task}", seed, index)
    if task == "synth-textvqa":
        scene = sample_scene(rng, rng.randint(2, 4), text=_random_text(rng))
        question, answer = text_question(scene)
        return Sample(scene, question, answer, "number" if answer.isdigit() else "word")
    clutter = _random_text(rng) if rng.random() < 0.3 else None
    if task == "synth-pope":
        scene = sample_scene(rng, rng.randint(2, 4), text=clutter)
        question, answer, category = pope_question(scene, rng, present=index % 2 == 0)
        return Sample(scene, question, answer, category)
    if task == "synth-gqa":
        kind = GQA_KINDS[index % len(GQA_KINDS)]
        while True:  # redraw until the scene has a question of this kind
            scene = sample_scene(rng, rng.randint(3, 5), text=clutter)
            options = gqa_questions(scene)[kind]
            if options:
                question, answer = rng.choice(options)
                return Sample(scene, question, answer, kind)
    raise ValueError(f"unknown built-in task {task!r}; valid choices: {', '.join(TASKS)}")


TASKS = ("synth-gqa", "synth-textvqa", "synth-pope")


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    rows = []
    for i in range(n):
        sample = task_sample(task, seed, i)
        rows.append({"question_id": f"{task}-{seed}-{i}", "question": sample.question, "answer": sample.answer,
                     "category": sample.kind, "image": {"bytes": png_bytes(render(sample.scene)), "path": None}})
    return rows


def task_dataset(task: str, n: int, seed: int):
    """An HF dataset (question_id, question, answer, category, image) of a built-in task."""
    import datasets

    features = datasets.Features({
        "question_id": datasets.Value("string"), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "category": datasets.Value("string"), "image": datasets.Image(),
    })
    return datasets.Dataset.from_list(task_rows(task, n, seed), features=features)


def prompt_text(task: str, question: str) -> str:
    """The text lmms-eval's task hands the model (its doc_to_text), so training sees the same prompts."""
    if task == "synth-textvqa":  # TextVQA capitalises the question
        question = question.capitalize()
    return f"{question.strip()}{POST_PROMPT}"


def vision_scene(seed: int, index: int) -> Scene:
    """A crowded scene for pretraining the vision tower (stream ``vision``): many shapes, repeats
    allowed, and several printed numbers and words, so every step sees every class often."""
    rng = rng_for("vision", seed, index)
    background = tuple(rng.randint(205, 250) for _ in range(3))
    taken: list = []
    texts = []
    for _ in range(rng.randint(3, 6)):
        string = _random_text(rng)
        box = _place(rng, len(string) * PATCH, PATCH, taken)
        if box is not None:
            taken.append(box)
            texts.append(Text(string, box[0], box[1], tuple(rng.randint(0, 60) for _ in range(3))))
    shapes = []
    for _ in range(rng.randint(4, 10)):
        box = _place(rng, 2 * PATCH, 2 * PATCH, taken)
        if box is not None:
            taken.append(box)
            shapes.append(Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), box))
    return Scene(background, tuple(shapes), None, tuple(texts))


CAPTION_PROMPT = "Describe the image."


def caption(scene: Scene) -> str:
    """Every object ("red circle") and the printed string, in reading order (as the visual tokens)."""
    items = [(s.box[1], s.box[0], f"{s.colour} {s.shape}") for s in scene.shapes]
    items += [(t.y, t.x, t.string) for t in scene.texts]
    return " , ".join(words for _, _, words in sorted(items))


def _training_scene(rng: random.Random, numbers: float = 0.5) -> Scene:
    """A training scene: 2-5 shapes, and a printed string 60 % of the time (a number with
    probability ``numbers``)."""
    text = _random_text(rng, numbers) if rng.random() < 0.6 else None
    return sample_scene(rng, rng.randint(2, 5), text=text)


def existence_example(seed: int, index: int, turns: int = 6) -> tuple[Scene, list[tuple[str, str]]]:
    """A scene (stream ``existence``, disjoint from every evaluation stream) with ``turns`` POPE-style
    questions only, half present and half absent, then its caption: the reader's first phase."""
    rng = rng_for("existence", seed, index)
    scene = _training_scene(rng)
    pool = []
    for i in range(turns):
        question, answer, _ = pope_question(scene, rng, present=i % 2 == 0)
        pool.append((prompt_text("synth-pope", question), answer))
    rng.shuffle(pool)
    return scene, pool + [(CAPTION_PROMPT, caption(scene))]


def training_example(seed: int, index: int, turns: int = 6) -> tuple[Scene, list[tuple[str, str]]]:
    """A training scene (stream ``train``, disjoint from every evaluation stream) and up to ``turns``
    (prompt text, answer) pairs about it, mixing all three tasks' question kinds, then its caption
    (last, so no question can be answered by copying it)."""
    rng = rng_for("train", seed, index)
    scene = _training_scene(rng)
    pool: list[tuple[str, str]] = []
    for options in gqa_questions(scene).values():
        pool += [(prompt_text("synth-gqa", q), a) for q, a in rng.sample(options, min(2, len(options)))]
    if scene.text is not None:
        pool += [(prompt_text("synth-textvqa", text_question(scene)[0]), scene.text.string)] * 2
    for present in (True, False):
        question, answer, _ = pope_question(scene, rng, present)
        pool.append((prompt_text("synth-pope", question), answer))
    rng.shuffle(pool)
    return scene, pool[:turns] + [(CAPTION_PROMPT, caption(scene))]


def side_questions(scene: Scene) -> list[tuple[str, str]]:
    """"Is the red circle on the left or right of the image?" for every shape whose centre lies at
    least 8 px from the middle: reading one object's column, the step before comparing two."""
    return [(f"Is the {s.colour} {s.shape} on the left or right of the image?", "left" if s.centre_x < SIZE / 2 else "right")
            for s in scene.shapes if abs(s.centre_x - SIZE / 2) >= 8]


def position_example(seed: int, index: int, relation_share: float) -> tuple[Scene, list[tuple[str, str]]]:
    """A scene (stream ``position``) and one question: left/right-of two objects with probability
    ``relation_share``, else the side of the image one object is on (0: side questions only)."""
    rng = rng_for("position", seed, index)
    while True:
        scene = _training_scene(rng)
        relation = rng.random() < relation_share
        options = gqa_questions(scene)["relation"] if relation else side_questions(scene)
        if options:
            question, answer = rng.choice(options)
            return scene, [(prompt_text("synth-gqa", question), answer)]


QUOTA_KINDS = ("existence", "text", "position", "other")


def quota_example(seed: int, index: int, turns: int = 6, quotas: tuple[int, ...] = (2, 2, 2, 2),
                  numbers: float = 0.5) -> tuple[Scene, list[tuple[str, str]]]:
    """A scene (stream ``quota``) with ``turns`` questions drawn from quotas: ``quotas[k]`` questions
    of kind ``QUOTA_KINDS[k]`` (position: side or left/right-of; other: colour, shape or count; text
    falls back to other when the scene has no string), shuffled, ``turns`` of them kept, then its
    caption: every skill in every conversation, so that a phase after single-kind ones relearns them
    all together. ``numbers``: the share of printed strings that are numbers (words are read long
    before numbers are)."""
    rng = rng_for("quota", seed, index)
    scene = _training_scene(rng, numbers)
    gqa = gqa_questions(scene)
    pool: list[tuple[str, str]] = []
    for kind in (kind for kind, n in zip(QUOTA_KINDS, quotas, strict=True) for _ in range(n)):
        if kind == "text" and scene.text is not None:
            pool.append((prompt_text("synth-textvqa", text_question(scene)[0]), scene.text.string))
            continue
        if kind == "existence":
            question, answer, _ = pope_question(scene, rng, present=rng.random() < 0.5)
            pool.append((prompt_text("synth-pope", question), answer))
            continue
        if kind == "position":
            options = gqa["relation"] if rng.random() < 0.5 and gqa["relation"] else side_questions(scene)
        else:
            options = gqa[rng.choice([k for k in ("colour", "shape", "count") if gqa[k]])]
        if options:
            question, answer = rng.choice(options)
            pool.append((prompt_text("synth-gqa", question), answer))
    rng.shuffle(pool)
    return scene, pool[:turns] + [(CAPTION_PROMPT, caption(scene))]
