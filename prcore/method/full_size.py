"""The exact SD 1.5, SD 2.1 (768 px, v-prediction), SDXL-base and SD 3 / 3.5 architectures, random-initialised.

No weights can be downloaded where prcore is developed and tested, so the real path (shapes,
dtypes, conditioning, memory, file layout) is exercised on pipelines built here from the published
configurations: :func:`build_full_size` writes a standard diffusers folder (hub layout: one
sub-folder per component, ``model_index.json``, safetensors, optionally the ``fp16`` variant, or
only that variant, as hub repos that ship fp16 alone do)
that :func:`prcore.method.models.load_pipeline` opens exactly like the hub's. Random weights draw
noise, but every tensor has the real shape. The configurations and the (real) CLIP tokenizers are
:mod:`prcore.method.architectures`'s.

    python -m prcore.method.full_size sd15 OUT [--seed 0] [--no-fp16 | --fp16-only] [--device cuda]
    # also sd21, sdxl, sd3m, sd35m, sd35l

SD 3 / 3.5 folders leave T5-XXL out (``text_encoder_3`` null: 4.7 B parameters, 19 GB in fp32, and no T5
tokenizer can be carried here); CLIP-L's projection is written as the identity, as SD3 uses it. Sizes
(transformer with its stored position embedding, CLIP-L, CLIP-bigG, VAE; checked against keras-hub's
published counts, :data:`prcore.method.architectures.SD3_PUBLISHED_PARAMS`):

=========  ===============  ==============  ==============  =============================================
name       parameters       fp32 on disk    fp16 on disk    builds on a 23 GB machine (fp32 drawn first)
=========  ===============  ==============  ==============  =============================================
``sd35m``  3.37 B           13.5 GB         6.7 GB          yes: ~10 GB peak (the transformer)
``sd35l``  9.05 B           36.2 GB         18.1 GB         no: the transformer alone is 32.6 GB in fp32
                                                            (``--device cuda`` on a GPU machine)
=========  ===============  ==============  ==============  =============================================
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from prcore.method.architectures import ARCHITECTURES, architecture, component_name, denoiser, write_config_folder


def build_full_size(path: str | Path, name: str, *, seed: int = 0, fp16_variant: bool = True, fp32: bool = True,
                    device: str = "cpu") -> Path:
    """Write the ``name`` architecture ("sd15", "sd21", "sdxl", "sd3m", "sd35m", "sd35l") with random
    weights to ``path`` (SD 3 / 3.5 without T5).

    The configs and tokenizers come from :func:`prcore.method.architectures.write_config_folder` (the
    same files a single-file checkpoint is loaded with). Components are built and saved one at a time
    (with their fp16 variant right after), so peak memory is the largest component, not the pipeline.
    ``fp32=False`` writes only the ``*.fp16.safetensors`` files (an fp16-only folder: half the disk).
    ``device="cuda"`` draws the random weights on the GPU (seconds instead of a minute of serial CPU
    random numbers for SDXL; other numbers than the CPU draws for the same seed, the same shapes and files).
    """
    if not (fp32 or fp16_variant):
        raise ValueError("nothing to write: fp32=False needs fp16_variant=True")
    import diffusers
    import transformers

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; give a new folder")
    write_config_folder(name, path)
    index = json.loads((path / "model_index.json").read_text())

    def save(component: str, module: Any) -> None:
        module = module.to("cpu")
        if fp32:
            module.eval().save_pretrained(path / component, safe_serialization=True)
        if fp16_variant:
            module.to(torch.float16).save_pretrained(path / component, safe_serialization=True, variant="fp16")

    for offset, component in enumerate((denoiser(architecture(name))[0], "vae")):
        torch.manual_seed(seed + offset)
        cls = getattr(diffusers, index[component][1])
        with torch.device(device):
            module = cls.from_config(cls.load_config(path / component))
        save(component, module)
    for i in range(len(ARCHITECTURES[name]["text_encoders"])):
        torch.manual_seed(seed + 2 + i)
        component = component_name("text_encoder", i)
        cls = getattr(transformers, index[component][1])
        with torch.device(device):
            module = cls(transformers.CLIPTextConfig.from_pretrained(path / component))
        if index["_class_name"] == "StableDiffusion3Pipeline" and i == 0:
            with torch.no_grad():  # SD3 conditions on CLIP-L's unprojected pooled output
                module.text_projection.weight.copy_(torch.eye(module.text_projection.weight.shape[0]))
        save(component, module)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("architecture", choices=sorted(ARCHITECTURES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--no-fp16", action="store_true", help="skip the fp16 variant files")
    only.add_argument("--fp16-only", action="store_true", help="write only the fp16 variant files")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: much faster)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    build_full_size(args.out, args.architecture, seed=args.seed, fp16_variant=not args.no_fp16, fp32=not args.fp16_only,
                    device=args.device)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.architecture} to {args.out}: {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
