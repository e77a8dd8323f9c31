"""A POPE-style existence task rendered in code: "Is there a <colour> <shape> in the image?".

Each image holds a few coloured shapes on a plain background; half of the questions ask about a
shape that is present, half about one that is absent (balanced yes/no, as POPE is). The answer
depends on one small region of the image, so pruning that drops it loses the answer. Samples are
a pure function of (seed, index): the same seed gives the same bytes.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40),
           "purple": (140, 60, 170), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
SIZE = 336


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def pope_sample(seed: int, index: int, n_objects: int = 3, size: int = SIZE) -> dict:
    rng = random.Random(f"{seed}:{index}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    present = rng.sample(pairs, n_objects)
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    cell = size // 3
    for (colour, shape), slot in zip(present, rng.sample(range(9), n_objects)):
        extent = rng.randint(cell // 3, cell // 2)
        x = (slot % 3) * cell + rng.randint(0, cell - extent)
        y = (slot // 3) * cell + rng.randint(0, cell - extent)
        draw_shape(draw, shape, (x, y, x + extent, y + extent), COLOURS[colour])
    answer = "yes" if index % 2 == 0 else "no"
    colour, shape = rng.choice(present) if answer == "yes" else rng.choice([p for p in pairs if p not in present])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {
        "question_id": f"shapes-{seed}-{index}",
        "question": f"Is there a {colour} {shape} in the image?",
        "answer": answer,
        "category": "synthetic",
        "image": {"bytes": buffer.getvalue(), "path": None},
    }


def pope_dataset(n: int, seed: int):
    """An HF dataset with POPE's columns (question_id, question, answer, category, image)."""
    import datasets

    features = datasets.Features({
        "question_id": datasets.Value("string"), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "category": datasets.Value("string"), "image": datasets.Image(),
    })
    rows = [pope_sample(seed, i) for i in range(n)]
    return datasets.Dataset.from_list(rows, features=features)
