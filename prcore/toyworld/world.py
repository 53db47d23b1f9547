"""A deterministic procedural image world: shapes with colors and patterns, backgrounds, scenes, styles.

Every image is a pure function of a :class:`Spec` (and its integer ``seed`` for jitter), so the same
spec renders to the same pixels on every machine. Captions name what is in the picture in plain
words, e.g. ``"a green striped square on a red background in sketch style"``.

Objects are drawn at 4x resolution with PIL and box-downsampled to ``SIZE`` x ``SIZE`` (antialiasing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
_SS = 4  # supersampling factor

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 130, 20),
    "purple": (140, 40, 180),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
SPLITS = ("vertical", "horizontal", "diagonal")
MARKS = ("dot", "ring", "bar")
SCENES = ("field", "night", "desert", "snow")
SCENE_PHRASES = {"field": "in a field", "night": "at night", "desert": "in the desert", "snow": "in the snow"}
STYLES = ("photo", "sketch", "pixel", "inverted", "sepia")
# Background label: "<color>" for "on a <color> background", or "scene:<name>".
BACKGROUNDS = tuple(COLORS) + tuple(f"scene:{s}" for s in SCENES)

WORDS = tuple(
    dict.fromkeys(
        "a an on in at the of and style background field night desert snow sketch pixel inverted sepia "
        "plain striped dotted checkered sks and split vertical horizontal diagonal with dot ring bar".split()
        + list(SHAPES)
        + list(COLORS)
    )
)


@dataclass(frozen=True)
class Spec:
    """Everything that decides one picture. ``seed`` drives size/position/rotation jitter and scene details."""

    shape: str
    color: str
    pattern: str = "plain"
    background: str = "white"  # a color name or "scene:<name>"
    style: str = "photo"
    seed: int = 0
    # Personalization subjects only: a second color for a two-tone split and a mark.
    color2: str | None = None
    split: str | None = None  # "vertical" | "horizontal" | "diagonal"
    mark: str | None = None  # "dot" | "ring" | "bar"
    mark_color: str | None = None
    # Explicit pose (else drawn from seed): size in px at SIZE, center offsets, rotation degrees.
    pose: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; use one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; use one of {tuple(COLORS)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; use one of {PATTERNS}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; use one of {BACKGROUNDS}")
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; use one of {STYLES}")
        if self.color2 is not None and (self.color2 not in COLORS or self.split not in SPLITS):
            raise ValueError(f"a two-tone object needs color2 in {tuple(COLORS)} and split in {SPLITS}")
        if self.mark is not None and (self.mark not in MARKS or self.mark_color not in COLORS):
            raise ValueError(f"a marked object needs mark in {MARKS} and mark_color in {tuple(COLORS)}")


def background_phrase(background: str) -> str:
    if background.startswith("scene:"):
        return SCENE_PHRASES[background[6:]]
    return f"on a {background} background"


def style_phrase(style: str) -> str:
    return "" if style == "photo" else f"in {style} style"


def object_phrase(spec: Spec, *, drop: frozenset[str] = frozenset(), noun: str | None = None) -> str:
    """``"a red and blue vertical split circle with a yellow dot"``; ``drop`` may hold "color" (all tone
    words, the split too), "pattern", "mark"."""
    words = []
    if "color" not in drop:
        if spec.color2 is not None:
            words += [spec.color, "and", spec.color2, spec.split, "split"]
        else:
            words.append(spec.color)
    if spec.pattern != "plain" and "pattern" not in drop:
        words.append(spec.pattern)
    words.append(noun or spec.shape)
    if spec.mark is not None and "mark" not in drop:
        words += ["with", "an" if spec.mark_color[0] in "aeiou" else "a", spec.mark_color, spec.mark]
    return ("an" if words[0][0] in "aeiou" else "a") + " " + " ".join(words)


def caption(spec: Spec, *, drop: frozenset[str] = frozenset(), noun: str | None = None) -> str:
    """Plain-word caption; ``drop`` may hold "color", "pattern", "mark", "background", "style" to leave them unsaid."""
    words = [object_phrase(spec, drop=drop, noun=noun)]
    if "background" not in drop:
        words.append(background_phrase(spec.background))
    if spec.style != "photo" and "style" not in drop:
        words.append(style_phrase(spec.style))
    return " ".join(words)


def _pose(spec: Spec, rng: np.random.Generator) -> tuple[float, float, float, float]:
    if spec.pose is not None:
        return spec.pose
    size = rng.uniform(11.0, 19.0)
    dx, dy = rng.uniform(-5.0, 5.0, size=2)
    rot = rng.uniform(-25.0, 25.0) if spec.shape != "circle" else rng.uniform(0, 360)
    return float(size), float(dx), float(dy), float(rot)


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(math.radians(45 + 90 * k)), math.sin(math.radians(45 + 90 * k))) for k in range(4)]
        scale = r * 1.0
    elif shape == "triangle":
        pts = [(math.cos(math.radians(-90 + 120 * k)), math.sin(math.radians(-90 + 120 * k))) for k in range(3)]
        scale = r * 1.15
        cy += r * 0.15
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
        scale = r * 1.1
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        scale = r * 1.15
    elif shape == "cross":
        t = 0.35
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
        scale = r * 0.95
    else:
        raise ValueError(shape)
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in pts]


def _mask(spec: Spec, pose: tuple[float, float, float, float]) -> Image.Image:
    n = SIZE * _SS
    size, dx, dy, rot = pose
    cx, cy, r = (SIZE / 2 + dx) * _SS, (SIZE / 2 + dy) * _SS, size / 2 * _SS
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    if spec.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(_polygon(spec.shape, cx, cy, r, rot), fill=255)
    return m


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (20, 20, 20) if lum > 140 else (240, 240, 240)


def _fill(spec: Spec, pose: tuple[float, float, float, float]) -> np.ndarray:
    """The object's texture over the whole canvas (n x n x 3 float), before masking."""
    n = SIZE * _SS
    base = np.array(COLORS[spec.color], dtype=np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / _SS  # in output pixels
    size, dx, dy, rot = pose
    cx, cy = SIZE / 2 + dx, SIZE / 2 + dy
    out = np.broadcast_to(base, (n, n, 3)).copy()
    if spec.color2 is not None:
        c2 = np.array(COLORS[spec.color2], dtype=np.float32)
        a = math.radians(rot)
        u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
        side = {"vertical": u > 0, "horizontal": v > 0, "diagonal": (u + v) > 0}[spec.split or "vertical"]
        out[side] = c2
    other = np.array(_contrast(COLORS[spec.color]), dtype=np.float32)
    if spec.pattern == "striped":
        on = ((xx - cx + yy - cy) / 5.0) % 1.0 < 0.45
    elif spec.pattern == "dotted":
        on = ((((xx - cx) / 5.0) % 1.0 - 0.5) ** 2 + (((yy - cy) / 5.0) % 1.0 - 0.5) ** 2) < 0.06
    elif spec.pattern == "checkered":
        on = (np.floor((xx - cx) / 4.0) + np.floor((yy - cy) / 4.0)) % 2 == 0
    else:
        on = None
    if on is not None:
        out[on] = other
    if spec.mark is not None:
        mc = np.array(COLORS[spec.mark_color or "white"], dtype=np.float32)
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
        rr = size / 2
        if spec.mark == "dot":
            m = r2 < (0.22 * rr) ** 2
        elif spec.mark == "ring":
            m = (r2 < (0.42 * rr) ** 2) & (r2 > (0.24 * rr) ** 2)
        else:  # bar across the middle, perpendicular to the split
            a = math.radians(rot)
            v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
            u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
            m = (np.abs(v) < 0.12 * rr) & (np.abs(u) < 0.6 * rr)
        out[m] = mc
    return out


def _background(background: str, rng: np.random.Generator) -> np.ndarray:
    n = SIZE * _SS
    if not background.startswith("scene:"):
        return np.broadcast_to(np.array(COLORS[background], np.float32), (n, n, 3)).copy()
    scene = background[6:]
    yy = np.mgrid[0:n, 0:n][0].astype(np.float32) / n
    horizon = rng.uniform(0.62, 0.75)
    if scene == "night":
        top, bottom = np.array([5, 8, 35], np.float32), np.array([25, 30, 80], np.float32)
        img = top + (bottom - top) * yy[..., None]
        for _ in range(int(rng.integers(5, 10))):
            x, y = rng.integers(0, n - _SS, size=2)
            img[y : y + _SS, x : x + _SS] = 235
        mx, my = rng.uniform(0.1, 0.9) * n, rng.uniform(0.08, 0.25) * n
        yv, xv = np.mgrid[0:n, 0:n]
        img[(xv - mx) ** 2 + (yv - my) ** 2 < (2.5 * _SS) ** 2] = np.array([240, 235, 190], np.float32)
        return img
    sky = {"field": (120, 180, 245), "desert": (150, 200, 250), "snow": (185, 195, 210)}[scene]
    ground = {"field": (50, 150, 50), "desert": (225, 190, 120), "snow": (250, 250, 252)}[scene]
    img = np.empty((n, n, 3), np.float32)
    img[:] = sky
    img[yy > horizon] = ground
    if scene == "desert":  # sun
        mx, my = rng.uniform(0.1, 0.9) * n, rng.uniform(0.08, 0.25) * n
        yv, xv = np.mgrid[0:n, 0:n]
        img[(xv - mx) ** 2 + (yv - my) ** 2 < (3 * _SS) ** 2] = np.array([250, 200, 40], np.float32)
    return img


def _stylize(img: np.ndarray, style: str) -> np.ndarray:
    """img: SIZE x SIZE x 3 uint8 -> same, restyled."""
    if style == "photo":
        return img
    if style == "inverted":
        return 255 - img
    if style == "sepia":  # a strong brown tint; hues stay readable
        m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
        f = img.astype(np.float32)
        return np.clip(0.6 * (f @ m.T) + 0.4 * f, 0, 255).round().astype(np.uint8)
    if style == "pixel":
        b = 4
        small = img.reshape(SIZE // b, b, SIZE // b, b, 3).mean(axis=(1, 3))
        return np.repeat(np.repeat(small, b, 0), b, 1).round().astype(np.uint8)
    if style == "sketch":  # colored-pencil outlines on paper: both sides of every edge, in their own colors
        f = img.astype(np.float32)
        p = np.pad(f, ((1, 1), (1, 1), (0, 0)), mode="edge")
        diff = np.zeros(f.shape[:2], np.float32)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            diff = np.maximum(diff, np.abs(p[dy : dy + SIZE, dx : dx + SIZE] - f).sum(-1))
        edge = diff > 60
        out = np.full_like(img, 245)
        out[edge] = (f[edge] * 0.85).round().astype(np.uint8)
        return out
    raise ValueError(style)


def render(spec: Spec) -> Image.Image:
    """Render one SIZE x SIZE RGB picture; deterministic in ``spec``."""
    rng = np.random.default_rng([spec.seed, 7919])
    pose = _pose(spec, rng)
    bg = _background(spec.background, rng)
    fill = _fill(spec, pose)
    alpha = np.asarray(_mask(spec, pose), np.float32)[..., None] / 255.0
    big = bg * (1 - alpha) + fill * alpha
    small = big.reshape(SIZE, _SS, SIZE, _SS, 3).mean(axis=(1, 3))
    img = np.clip(small.round(), 0, 255).astype(np.uint8)
    return Image.fromarray(_stylize(img, spec.style))


def identity_key(spec: Spec) -> tuple:
    """What makes an object's look (shape, the tones as a set, split, mark and its color): a mirror image
    (tones swapped) is the same look."""
    tones = frozenset((spec.color, spec.color2)) if spec.color2 is not None else frozenset((spec.color,))
    return (spec.shape, tones, spec.split, spec.pattern, spec.mark, spec.mark_color)


_HELD_OUT: set[tuple] = set()


def hold_out(looks) -> None:
    """Register looks (``identity_key`` tuples) the base world must never draw: the subjects'
    (``prcore.toyworld.subjects`` registers them when it is imported, which ``prcore.toyworld`` does)."""
    _HELD_OUT.update(looks)


def held_out_looks() -> set[tuple]:
    """The personalization subjects' exact looks: never drawn by the base world."""
    return _HELD_OUT


def random_spec(rng: np.random.Generator, *, style_prob: float = 0.4, scene_prob: float = 0.35,
                two_tone_prob: float = 0.45, mark_prob: float = 0.45) -> Spec:
    """One training picture of the base world. Objects are one- or two-toned (split along any axis),
    may carry a mark of another color (dot, ring, bar) or, when one-toned and unmarked, a pattern; every
    combination is possible except the personalization subjects' exact looks (``held_out_looks``)."""
    names = list(COLORS)
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = names[rng.integers(len(names))]
        color2 = split = mark = mark_color = None
        if rng.random() < two_tone_prob:
            others = [c for c in names if c != color]
            color2 = others[rng.integers(len(others))]
            split = SPLITS[rng.integers(len(SPLITS))]
        if rng.random() < mark_prob:
            others = [c for c in names if c not in (color, color2)]
            mark = MARKS[rng.integers(len(MARKS))]
            mark_color = others[rng.integers(len(others))]
        pattern = "plain"
        if color2 is None and mark is None and rng.random() < 0.3:
            pattern = PATTERNS[1 + rng.integers(len(PATTERNS) - 1)]
        if rng.random() < scene_prob:
            background = f"scene:{SCENES[rng.integers(len(SCENES))]}"
        else:
            choices = [c for c in names if c not in (color, color2)]
            background = choices[rng.integers(len(choices))]
        style = STYLES[1 + rng.integers(len(STYLES) - 1)] if rng.random() < style_prob else "photo"
        spec = Spec(shape, color, pattern, background, style, seed=int(rng.integers(2**31)),
                    color2=color2, split=split, mark=mark, mark_color=mark_color)
        if identity_key(spec) not in held_out_looks():
            return spec


def random_caption(spec: Spec, rng: np.random.Generator) -> str:
    """Caption with attributes sometimes left unsaid, so partial prompts ("a circle in sepia style") work."""
    drop = set()
    if rng.random() < 0.12:
        drop.add("color")
    if rng.random() < 0.25:
        drop.add("pattern")
    if rng.random() < 0.12:
        drop.add("mark")
    if rng.random() < 0.15:
        drop.add("background")
    return caption(spec, drop=frozenset(drop))


def dataset(n: int, seed: int) -> tuple[np.ndarray, list[str], list[Spec]]:
    """``n`` pictures (uint8 n x SIZE x SIZE x 3), their captions and specs; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng) for _ in range(n)]
    caps = [random_caption(s, rng) for s in specs]
    imgs = np.stack([np.asarray(render(s)) for s in specs])
    return imgs, caps, specs


def with_style(spec: Spec, style: str) -> Spec:
    return replace(spec, style=style)
