"""Personalization subjects: novel objects the base model never saw as a whole.

Each subject is a world shape (its class noun) painted in two tones split along a fixed axis, with a
mark of a third color. The base world draws all of these ingredients compositionally and names them
in its captions ("a red and blue vertical split circle with a yellow dot"), but never a subject's exact
combination (``world.held_out_looks``), and the personal prompt ("a sks circle on a red background")
does not describe it: only the subject's LoRA can supply the look. Four reference pictures per subject
vary pose and background.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from prcore.toyworld import world


@dataclass(frozen=True)
class Subject:
    subject_id: str
    class_noun: str
    spec: world.Spec  # pose/background/style/seed are placeholders; references vary them

    def render(self, *, background: str, pose: tuple[float, float, float, float] | None = None,
               style: str = "photo", seed: int = 0) -> Image.Image:
        return world.render(replace(self.spec, background=background, pose=pose, style=style, seed=seed))


def _subject(sid: str, shape: str, color: str, color2: str, split: str, mark: str, mark_color: str) -> Subject:
    spec = world.Spec(shape, color, "plain", "white", "photo", 0, color2=color2, split=split, mark=mark, mark_color=mark_color)
    return Subject(sid, shape, spec)


SUBJECTS: tuple[Subject, ...] = (
    _subject("redblue_circle", "circle", "red", "blue", "vertical", "dot", "yellow"),
    _subject("greenyellow_square", "square", "green", "yellow", "diagonal", "ring", "black"),
    _subject("purpleorange_triangle", "triangle", "purple", "orange", "horizontal", "dot", "white"),
    _subject("yellowblack_star", "star", "yellow", "black", "vertical", "dot", "red"),
    _subject("bluewhite_diamond", "diamond", "blue", "white", "horizontal", "bar", "red"),
    _subject("orangegreen_cross", "cross", "orange", "green", "diagonal", "dot", "purple"),
)

# Poses (size px, dx, dy, rotation deg) and backgrounds of the 4 references: varied but all "photo".
# A solid background is the first color of its list that the subject does not wear.
REFERENCE_VIEWS: tuple[tuple[tuple[str, ...], tuple[float, float, float, float]], ...] = (
    (("white", "black"), (18.0, 0.0, 0.0, 0.0)),
    (("scene:field",), (15.0, -4.0, -2.0, 12.0)),
    (("black", "purple", "blue"), (16.0, 3.0, 2.0, -15.0)),
    (("scene:desert",), (14.0, 2.0, -3.0, 20.0)),
)


def _reference_background(subject: Subject, choices: tuple[str, ...]) -> str:
    worn = {subject.spec.color, subject.spec.color2, subject.spec.mark_color}
    return next(c for c in choices if c not in worn)


def get(subject_id: str) -> Subject:
    for s in SUBJECTS:
        if s.subject_id == subject_id:
            return s
    raise KeyError(f"unknown toy subject {subject_id!r}; known: {[s.subject_id for s in SUBJECTS]}")


def look_alikes(subject: Subject) -> tuple[Subject, ...]:
    """Same-class distractors: the other five subjects' looks (tones, split axis, mark, mark color)
    painted on this subject's shape, ids ``<subject_id>~<other_id>``. Identification among the subject
    and these reads the look, not the shape the class noun already names (chance 1/6)."""
    return tuple(Subject(f"{subject.subject_id}~{o.subject_id}", subject.class_noun, replace(o.spec, shape=subject.spec.shape))
                 for o in SUBJECTS if o.subject_id != subject.subject_id)


def references(subject: Subject) -> list[Image.Image]:
    """The subject's 4 reference pictures (deterministic)."""
    return [subject.render(background=_reference_background(subject, bgs), pose=pose, seed=i)
            for i, (bgs, pose) in enumerate(REFERENCE_VIEWS)]


def reference_backgrounds(subject: Subject) -> list[str]:
    return [_reference_background(subject, bgs) for bgs, _ in REFERENCE_VIEWS]


def reference_captions(subject: Subject) -> list[str]:
    """Training caption templates naming each reference's background, e.g. "a {subject} in a field"."""
    return [f"a {{subject}} {world.background_phrase(bg)}" for bg in reference_backgrounds(subject)]


def write_references(folder: str | Path) -> dict[str, list[Path]]:
    """Write ``<folder>/<subject_id>/<i>.png`` for every subject; returns the paths per subject."""
    folder = Path(folder)
    out: dict[str, list[Path]] = {}
    for s in SUBJECTS:
        d = folder / s.subject_id
        d.mkdir(parents=True, exist_ok=True)
        out[s.subject_id] = []
        for i, img in enumerate(references(s)):
            p = d / f"{i}.png"
            img.save(p)
            out[s.subject_id].append(p)
    return out


def is_subject_like(spec: world.Spec) -> bool:
    """True for any two-toned or marked object (the base world draws many; see :func:`is_subject_look`)."""
    return spec.color2 is not None or spec.mark is not None


def is_subject_look(spec: world.Spec) -> bool:
    """True when ``spec`` has one subject's exact look (mirror images included); the base world never does."""
    return world.identity_key(spec) in world.held_out_looks()


def description(subject: Subject) -> str:
    """The subject's look in world words, e.g. "a red and blue vertical split circle with a yellow dot"."""
    return world.object_phrase(subject.spec)


world.hold_out(world.identity_key(s.spec) for s in SUBJECTS)  # the base world never draws a subject's exact look
