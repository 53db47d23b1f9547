"""Measuring instruments of the toy world: the analogues of CLIP-T and DINO for its pictures.

* :class:`InstrumentNet` — one small CNN with an attribute head per world attribute (background or
  scene, style, shape, color, pattern) and an identity head (a 64-d L2-normalised embedding trained
  contrastively: two views of the same two-tone object in different poses/backgrounds are positives,
  other objects in the batch negatives; InfoNCE with temperature ``tau``).
* :class:`ToyScorer` — the product's scorer interface (``prcore.quality.scorer.ImageScorerProtocol``):

      alignment(x, p) = mean_{a in A(p)} P_a(value_a(p) | x)
      fidelity(x, R)  = (1/|R|) * sum_{r in R} cos(e(x), e(r))

  where ``A(p)`` holds the attributes a prompt fixes beyond its subject — background/scene (when
  stated) and style (stated, else "photo") — ``P_a`` the classifier's softmax for attribute ``a``
  and ``e`` the identity embedding.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prcore.toyworld import world

HEADS: dict[str, tuple[str, ...]] = {
    "background": world.BACKGROUNDS,
    "style": world.STYLES,
    "shape": world.SHAPES,
    "color": tuple(world.COLORS),  # the object's tones: one (one-toned) or the top two (two-toned)
    "pattern": world.PATTERNS,
    "split": ("none",) + world.SPLITS,
    "mark": ("none",) + world.MARKS,
    "mark_color": tuple(world.COLORS),  # meaningful only when a mark is there
}
EMBED_DIM = 64
WEIGHTS_FILE = "instruments.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class InstrumentNet(nn.Module):
    """32x32 RGB in [-1, 1] -> attribute logits per head and an identity embedding."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 16
            _block(width, 2 * width), nn.MaxPool2d(2),  # 8
            _block(2 * width, 4 * width), nn.MaxPool2d(2),  # 4
        )
        feat = 4 * width * 4 * 4
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(feat, 256), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})
        self.identity = nn.Sequential(nn.Linear(feat, 256), nn.ReLU(inplace=True), nn.Linear(256, EMBED_DIM))

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h = self.trunk(x)
        f = self.features(h)
        logits = {k: head(f) for k, head in self.heads.items()}
        emb = F.normalize(self.identity(h.flatten(1)), dim=-1)
        return logits, emb


def to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """PIL images / HxWx3 uint8 arrays -> N x 3 x SIZE x SIZE float in [-1, 1] (resized if needed)."""
    from PIL import Image

    arrs = []
    for im in images:
        if isinstance(im, np.ndarray):
            im = Image.fromarray(im if im.dtype == np.uint8 else (np.clip(im, 0, 1) * 255).round().astype(np.uint8))
        elif isinstance(im, (bytes, bytearray)):
            import io

            im = Image.open(io.BytesIO(bytes(im)))
        im = im.convert("RGB")
        if im.size != (world.SIZE, world.SIZE):
            im = im.resize((world.SIZE, world.SIZE), Image.BOX)
        arrs.append(np.asarray(im))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
    return x.div(127.5).sub(1.0)


IGNORE = -100


def labels_of(spec: world.Spec) -> dict[str, int]:
    """Class index per head (``color``: the first tone; see :func:`tones_of`); ``mark_color`` is
    ``IGNORE`` for unmarked objects."""
    out = {k: HEADS[k].index(getattr(spec, k)) for k in ("background", "style", "shape", "color", "pattern")}
    out["split"] = HEADS["split"].index(spec.split or "none")
    out["mark"] = HEADS["mark"].index(spec.mark or "none")
    out["mark_color"] = HEADS["mark_color"].index(spec.mark_color) if spec.mark is not None else IGNORE
    return out


def tones_of(spec: world.Spec) -> frozenset[str]:
    return frozenset((spec.color, spec.color2)) if spec.color2 is not None else frozenset((spec.color,))


def color_target(specs: Sequence[world.Spec]) -> torch.Tensor:
    """Soft targets of the ``color`` head: 1 on a one-toned object's color, 1/2 on each of two tones."""
    t = torch.zeros(len(specs), len(HEADS["color"]))
    for i, s in enumerate(specs):
        tones = tones_of(s)
        for c in tones:
            t[i, HEADS["color"].index(c)] = 1.0 / len(tones)
    return t


def attribute_correct(pred: dict[str, Any], spec: world.Spec) -> dict[str, bool]:
    """Whether each attribute of ``spec`` is recognised in ``pred`` (a :meth:`ToyScorer.classify` row):
    ``color`` compares the set of tones (the top one or two of the color head, as many as ``spec`` has)."""
    k = len(tones_of(spec))
    out = {
        "background": pred["background"] == spec.background,
        "style": pred["style"] == spec.style,
        "shape": pred["shape"] == spec.shape,
        "color": frozenset(pred["colors_ranked"][:k]) == tones_of(spec),
        "pattern": pred["pattern"] == spec.pattern,
        "split": pred["split"] == (spec.split or "none"),
        "mark": pred["mark"] == (spec.mark or "none"),
    }
    if spec.mark is not None:
        out["mark_color"] = pred["mark_color"] == spec.mark_color
    return out


_BG_RE = re.compile(r"on an? (\w+) background")
_STYLE_RE = re.compile(r"in (\w+) style")
_SCENES = {phrase: f"scene:{name}" for name, phrase in world.SCENE_PHRASES.items()}


def prompt_attributes(prompt: str) -> dict[str, str]:
    """What a prompt fixes beyond its subject: {"background": ..., "style": ...} (style defaults to photo).

    >>> prompt_attributes("a sks circle on a red background in sketch style")
    {'background': 'red', 'style': 'sketch'}
    """
    out: dict[str, str] = {}
    text = prompt.lower()
    m = _BG_RE.search(text)
    if m and m.group(1) in world.COLORS:
        out["background"] = m.group(1)
    for phrase, label in _SCENES.items():
        if phrase in text:
            out["background"] = label
    m = _STYLE_RE.search(text)
    out["style"] = m.group(1) if m and m.group(1) in world.STYLES else "photo"
    return out


@dataclass(frozen=True)
class ToyRefEmbeddings:
    count: int
    identity: torch.Tensor  # count x EMBED_DIM, L2-normalised


_NETS: dict[str, InstrumentNet] = {}
_LOCK = threading.Lock()


def default_weights() -> Path:
    from prcore.toyworld import weights_dir

    return weights_dir() / WEIGHTS_FILE


def load_net(path: str | Path | None = None) -> InstrumentNet:
    """The trained instruments (safetensors), once per process."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_weights()
    key = str(path.resolve())
    with _LOCK:
        if key not in _NETS:
            if not path.is_file():
                raise FileNotFoundError(f"toy-world instrument weights not found at {path}; run python -m prcore.toyworld.train_instruments")
            net = InstrumentNet()
            net.load_state_dict(load_file(str(path)))
            _NETS[key] = net.eval()
        return _NETS[key]


class ToyScorer:
    """Prompt alignment and subject fidelity of toy-world pictures, with the product's scorer interface."""

    metrics: tuple[str, ...] = ("alignment", "fidelity")

    def __init__(self, weights: str | Path | None = None, *, batch_size: int = 256) -> None:
        self.net = load_net(weights)
        self.batch_size = batch_size

    @torch.no_grad()
    def predict(self, images: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-head softmax probabilities (N x classes) and identity embeddings (N x EMBED_DIM)."""
        probs: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
        embs = []
        for i in range(0, len(images), self.batch_size):
            logits, emb = self.net(to_tensor(images[i : i + self.batch_size]))
            for k, v in logits.items():
                probs[k].append(v.softmax(-1))
            embs.append(emb)
        return {k: torch.cat(v) for k, v in probs.items()}, torch.cat(embs)

    def classify(self, images: Sequence[Any]) -> list[dict[str, Any]]:
        """Per image: the top class of every head, and ``colors_ranked`` (all colors, most likely tone first)."""
        probs, _ = self.predict(images)
        out = []
        for i in range(len(images)):
            row: dict[str, Any] = {k: HEADS[k][int(probs[k][i].argmax())] for k in HEADS}
            row["colors_ranked"] = [HEADS["color"][int(j)] for j in probs["color"][i].argsort(descending=True)]
            out.append(row)
        return out

    def identify(self, images: Sequence[Any], references: dict[str, Sequence[Any] | ToyRefEmbeddings]) -> list[dict[str, Any]]:
        """Which subject each image shows: ``{"subject": top-1 id, "sims": {id: mean cosine to its references}}``
        against every subject in ``references`` (id -> reference images or embeddings)."""
        _, emb = self.predict(list(images))
        refs = {k: v if isinstance(v, ToyRefEmbeddings) else self.embed_references(v) for k, v in references.items()}
        sims = {k: (emb @ r.identity.T).mean(-1) for k, r in refs.items()}
        keys = list(refs)
        out = []
        for i in range(emb.shape[0]):
            row = {k: float(sims[k][i]) for k in keys}
            out.append({"subject": max(row, key=row.get), "sims": row})
        return out

    def embed_references(self, references: Sequence[Any]) -> ToyRefEmbeddings:
        if len(references) == 0:
            raise ValueError("no reference images: fidelity compares against the subject's reference images")
        _, emb = self.predict(list(references))
        return ToyRefEmbeddings(len(references), emb)

    def score(self, images: Sequence[Any], prompt: str | Sequence[str] | None,
              references: Sequence[Any] | ToyRefEmbeddings | None) -> list[dict[str, float]]:
        """One dict per image: ``alignment`` (when a prompt is given), ``fidelity`` (when references are),
        plus ``p_background`` / ``p_style`` (the per-attribute probabilities behind alignment)."""
        images = list(images)
        n = len(images)
        if n == 0:
            return []
        prompts = [prompt] * n if isinstance(prompt, str) or prompt is None else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images: give one prompt, or one per image")
        probs, emb = self.predict(images)
        refs = references if isinstance(references, ToyRefEmbeddings) or references is None else self.embed_references(references)
        out: list[dict[str, float]] = []
        for i in range(n):
            row: dict[str, float] = {}
            if prompts[i] is not None:
                attrs = prompt_attributes(prompts[i])
                parts = []
                for k, v in attrs.items():
                    p = float(probs[k][i, HEADS[k].index(v)])
                    row[f"p_{k}"] = p
                    parts.append(p)
                row["alignment"] = float(np.mean(parts))
            if refs is not None:
                row["fidelity"] = float((emb[i] @ refs.identity.T).mean())
            out.append(row)
        return out
