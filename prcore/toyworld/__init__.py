"""The toy world: a procedural image world, a tiny text-to-image model trained on it, its subjects and
measuring instruments. Everything here is real (trained on this machine) and ships with the package.

    from prcore.method.models import load_pipeline
    from prcore.toyworld import model_path, subjects
    pipe = load_pipeline(model_path())            # a StableDiffusionPipeline, 32x32 pictures
    refs = subjects.references(subjects.SUBJECTS[0])
"""

from __future__ import annotations

from pathlib import Path

IDENTIFIER = "sks"


def weights_dir() -> Path:
    """Folder of everything trained that ships with the package."""
    return Path(__file__).resolve().parent / "weights"


def model_path() -> Path:
    """The shipped trained base pipeline (diffusers ``save_pretrained`` folder, safetensors)."""
    return weights_dir() / "pipeline"


def subjects_dir() -> Path:
    """Shipped reference PNGs: ``<subjects_dir>/<subject_id>/{0..3}.png``."""
    return weights_dir() / "subjects"


from prcore.toyworld import subjects as _subjects  # noqa: E402,F401  (registers the subjects' looks: the world never draws them)
