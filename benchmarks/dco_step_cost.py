"""Cost of one DCO training step relative to one plain DreamBooth step.

A DCO step adds one reference forward (the UNet with its LoRA off, on the base caption, no grad)
to the forward + backward of a DreamBooth step, so its floor is about 4/3; the goal is <= 1.40.

Both losses train the same subject, batch, resolution and rank through
``prcore.method.dco.train_subject_lora``; seconds per step cover only the optimisation loop
(latents and caption embeddings are cached before it). Runs alternate DCO / DreamBooth, one
warm-up run of each is discarded, and the ratio is median(DCO s/step) / median(DreamBooth s/step).
On CPU the clock is the process CPU time (single-threaded torch), which a busy shared machine
disturbs far less than wall time; on CUDA it is wall time.

    .venv/bin/python benchmarks/dco_step_cost.py              # tiny SD pipeline on CPU
    .venv/bin/python benchmarks/dco_step_cost.py --model DIR --device cuda --resolution 512

Last line: ``dco_step_cost_ratio=<x>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def subject_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder or hub id (default: a freshly built tiny SD pipeline)")
    ap.add_argument("--kind", default="sd", choices=["sd", "sdxl"], help="tiny pipeline kind when --model is not given")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=30, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per loss (after one warm-up each)")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                    help="wall time, or process CPU time (robust on busy shared CPUs); auto: cpu on CPU, wall on GPU")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids contention on shared cores)")
    args = ap.parse_args(argv)

    from prcore.data.schema import TrainConfig
    from prcore.method.dco import train_subject_lora
    from prcore.method.models import load_pipeline
    from prcore.method.tiny import build_tiny_pipeline

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    clock = args.clock if args.clock != "auto" else ("cpu" if args.device == "cpu" else "wall")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_pipeline(Path(tmp) / "tiny", args.kind)
        pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
        res = args.resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        images = subject_images(4, res)
        base = TrainConfig(steps=args.steps, resolution=res, rank=args.rank, alpha=float(args.rank),
                           batch_size=args.batch_size, random_flip=False)
        timings: dict[str, list[float]] = {"dco": [], "dreambooth": []}
        configs = {"dco": replace(base, dco_beta=1000.0), "dreambooth": replace(base, dco_beta=0.0)}
        for run in range(args.repeats + 1):
            for name, cfg in configs.items():
                result = train_subject_lora(
                    pipe, images=images, class_noun="dog", identifier="sks", out_dir=Path(tmp) / f"{name}-{run}",
                    config=replace(cfg, seed=run), progress=False,
                )
                if run > 0:  # run 0 is the warm-up
                    timings[name].append(result.record["cpu_seconds_per_step"] if clock == "cpu" else result.seconds_per_step)
        dco, db = statistics.median(timings["dco"]), statistics.median(timings["dreambooth"])
        device = f"{args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else args.device
        print(f"model={model if args.model else 'tiny-' + args.kind} device={device} dtype={args.dtype} "
              f"resolution={res} rank={args.rank} batch={args.batch_size} steps={args.steps} repeats={args.repeats} "
              f"clock={clock} threads={torch.get_num_threads() if args.device == 'cpu' else '-'}")
        print("dco s/step:        " + " ".join(f"{t:.4f}" for t in timings["dco"]) + f"  median {dco:.4f}")
        print("dreambooth s/step: " + " ".join(f"{t:.4f}" for t in timings["dreambooth"]) + f"  median {db:.4f}")
        ratio = dco / db
        print(f"dco_step_cost_ratio={ratio:.3f}")
        return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
