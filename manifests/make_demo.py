"""Regenerate ``manifests/demo.parquet`` and its subject images (deterministic; no downloads).

    .venv/bin/python manifests/make_demo.py

Two toy-world subjects (novel two-tone objects the shipped toy-world model never saw, see
docs/toyworld.md), their four reference pictures, and four prompts each: two plain scenes and two
stylized ones. Training settings are the toy-world benchmark's (a 32x32 model learns a subject in
~80 steps at a high learning rate); the captions name each reference's background, DCO's
"comprehensive captions".
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from prcore.toyworld import subjects

HERE = Path(__file__).resolve().parent
SUBJECT_IDS = ("redblue_circle", "greenyellow_square")
PROMPTS = (
    "a {subject} on a blue background",
    "a {subject} in the snow",
    "a {subject} at night in sketch style",
    "a {subject} in a field in inverted style",
)


def main() -> None:
    rows = []
    for subject_id in SUBJECT_IDS:
        subject = subjects.get(subject_id)
        folder = HERE / "demo_subjects" / subject_id
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for i, picture in enumerate(subjects.references(subject)):
            picture.save(folder / f"{i}.png", optimize=True)
            images.append(f"demo_subjects/{subject_id}/{i}.png")
        for prompt in PROMPTS:
            rows.append({
                "subject_id": subject_id,
                "instance_images": images,
                "class_noun": subject.class_noun,
                "instance_prompts": subjects.reference_captions(subject),
                "prompt": prompt,
                "num_images": 4,
                "guidance_scale": 5.0,
                "train_learning_rate": 2e-3,
                "train_rank": 4,
                "train_alpha": 4.0,
                "train_batch_size": 2,
            })
    pl.DataFrame(rows).write_parquet(HERE / "demo.parquet")
    print(f"wrote {HERE / 'demo.parquet'} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
