"""Regenerate ``manifests/demo.parquet`` and its subject images (deterministic; no downloads).

    .venv/bin/python manifests/make_demo.py

Two procedurally drawn subjects, three 64x64 reference PNGs each, and three DreamBench object
prompts per subject. A later toy-world issue replaces these with subjects of a trained toy model.
"""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 64
SUBJECTS = {
    # subject_id: (class noun, draw function name, main colour)
    "red_mug": ("mug", "mug", (200, 40, 40)),
    "teal_robot": ("robot toy", "robot", (30, 160, 150)),
}
PROMPTS = ["a {subject} in the jungle", "a {subject} in the snow", "a {subject} on the beach"]


def draw_subject(kind: str, colour: tuple[int, int, int], view: int) -> Image.Image:
    rng = random.Random(f"{kind}-{view}")
    background = tuple(rng.randint(200, 245) for _ in range(3))
    im = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(im)
    dx, dy = rng.randint(-6, 6), rng.randint(-4, 4)
    dark = tuple(max(0, c - 80) for c in colour)
    if kind == "mug":
        d.rectangle((18 + dx, 20 + dy, 40 + dx, 48 + dy), fill=colour, outline=dark)
        d.ellipse((36 + dx, 26 + dy, 50 + dx, 40 + dy), outline=dark, width=3)
        d.line((20 + dx, 26 + dy, 38 + dx, 26 + dy), fill=(255, 255, 255), width=2)
    else:
        d.rectangle((22 + dx, 26 + dy, 42 + dx, 50 + dy), fill=colour, outline=dark)
        d.rectangle((25 + dx, 12 + dy, 39 + dx, 25 + dy), fill=colour, outline=dark)
        d.ellipse((28 + dx, 16 + dy, 31 + dx, 19 + dy), fill=(250, 220, 40))
        d.ellipse((33 + dx, 16 + dy, 36 + dx, 19 + dy), fill=(250, 220, 40))
        d.line((32 + dx, 12 + dy, 32 + dx, 6 + dy), fill=dark, width=2)
    return im


def main() -> None:
    rows = []
    for subject_id, (noun, kind, colour) in SUBJECTS.items():
        folder = HERE / "demo_subjects" / subject_id
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for view in range(3):
            path = folder / f"{view}.png"
            draw_subject(kind, colour, view).save(path, optimize=True)
            images.append(f"demo_subjects/{subject_id}/{view}.png")
        for prompt in PROMPTS:
            rows.append({"subject_id": subject_id, "instance_images": images, "class_noun": noun, "prompt": prompt, "num_images": 2})
    pl.DataFrame(rows).write_parquet(HERE / "demo.parquet")
    print(f"wrote {HERE / 'demo.parquet'} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
