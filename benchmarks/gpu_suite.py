"""The GPU suite: full-size SD 1.5 and SDXL (random weights, built here), trained and sampled the way
prcore runs them, timed per dtype. Prints one markdown table and writes it (and JSON) to --out.

    python benchmarks/gpu_suite.py --out gpu-results            # on a CUDA machine: fp16 and bf16, both models
    python benchmarks/gpu_suite.py --models sd15 --work DIR --out gpu-results   # one model; folders in DIR reused
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke     # a reduced run on the CPU (tiny models, CI)

Rows per (model, dtype):
  train s/step       DCO LoRA step (rank 8, batch 1), the reference forward included, after a 2-step warm-up run;
                     min/subject = s/step x the default steps
  sample img/h       parallel-rescaled guidance, 4 images per call, one GPU
  diffusers img/h    diffusers' own CFG pipeline at the same size and steps (2 UNet rows per step vs 3)
  guidance cost      (seconds per image, prcore) / (seconds per image, diffusers CFG)
  peak GiB           torch.cuda.max_memory_allocated over the training / sampling run
Second table (--options, on the --options-dtype rows): sampling img/h with one image per denoising loop
(what batching buys), channels-last, classic attention instead of SDPA, torch.compile (prcore.method.accel),
each vs the first. The JSON and markdown are rewritten after every row, so a run cut short keeps what it measured.

Imports only torch, diffusers, transformers, peft, safetensors and prcore's model side
(``prcore.method``), so it runs on a bare GPU machine with those wheels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prcore.data.schema import TrainConfig  # noqa: E402
from prcore.method.accel import DenoiserOptions, configure_denoiser  # noqa: E402
from prcore.method.dco import train_subject_lora  # noqa: E402
from prcore.method.lora_io import load_subject_lora, unload_subject_lora  # noqa: E402
from prcore.method.models import clear_pipeline_cache, load_pipeline  # noqa: E402
from prcore.method.sampler import sample  # noqa: E402

# (name, architecture, training resolution, sampling size, sampling steps)
FULL = [("SD 1.5", "sd15", 512, 512, 50), ("SDXL", "sdxl", 1024, 1024, 30)]
SMOKE = [("tiny SD", "tiny-sd", 64, 64, 2), ("tiny SDXL", "tiny-sdxl", 64, 64, 2)]
WARMUP_TRAIN_STEPS = 2  # a short run first: CUDA context, kernel loading and cuDNN choices out of the timed steps
DEFAULT_TRAIN_STEPS = TrainConfig().steps


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def build(arch: str, root: Path) -> Path:
    target = root / arch
    if (target / "model_index.json").is_file():
        return target
    if arch.startswith("tiny-"):
        from prcore.method.tiny import build_tiny_pipeline

        return build_tiny_pipeline(target, arch.removeprefix("tiny-"))
    from prcore.method.full_size import build_full_size

    return build_full_size(target, arch, fp32=False)  # an fp16-only folder: loads in any dtype, half the bytes


def references(size: int, n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


OPTION_SETTINGS = {"channels_last": DenoiserOptions(channels_last=True), "classic_attention": DenoiserOptions(attention="classic"),
                   "compile": DenoiserOptions(channels_last=True, compile=True)}
OPTIONS = ("batch1", "channels_last", "classic_attention", "compile")


def run_one(name: str, folder: Path, dtype: str, device: str, train_res: int, size: int, steps: int, *,
            train_steps: int, images: int, repeats: int, work: Path, options: tuple[str, ...] = ()) -> dict:
    clear_pipeline_cache()
    pipe = load_pipeline(folder, device=device, dtype=dtype, cache=False)
    row: dict = {"model": name, "dtype": dtype, "device": device, "train_res": train_res, "size": size, "steps": steps}

    refs = references(train_res)
    train_subject_lora(pipe, images=refs, class_noun="dog", identifier="sks", out_dir=work / f"warmup-{folder.name}-{dtype}",
                       config=TrainConfig(steps=WARMUP_TRAIN_STEPS, rank=8, resolution=train_res), progress=False)
    reset_peak()
    config = TrainConfig(steps=train_steps, rank=8, resolution=train_res)
    result = train_subject_lora(pipe, images=refs, class_noun="dog", identifier="sks",
                                out_dir=work / f"lora-{folder.name}-{dtype}", config=config, progress=False)
    row.update(train_s_per_step=result.seconds_per_step, train_min_per_subject=result.seconds_per_step * DEFAULT_TRAIN_STEPS / 60,
               train_peak_gib=peak_gib(), mixed_precision=result.record["mixed_precision_used"])

    load_subject_lora(pipe, result.out_dir, "bench")
    try:
        reset_peak()
        kw = dict(prompt="a photo of a {subject} on the beach", class_noun="dog", identifier="sks", adapter_name="bench",
                  num_inference_steps=steps, height=size, width=size, seed=0, num_images=images, progress=False)
        ours = timed(lambda: sample(pipe, **kw), repeats) / images
        row["sample_peak_gib"] = peak_gib()
        # the speed options (prcore.method.accel), one at a time against `ours`; compile last (it cannot be undone)
        for option in options:
            if option == "batch1":  # one image per denoising loop: what batching buys
                secs = timed(lambda: sample(pipe, **{**kw, "num_images": 1}), repeats)
            else:
                configure_denoiser(pipe, OPTION_SETTINGS[option])
                secs = timed(lambda: sample(pipe, **kw), repeats) / images
            row[f"img_h_{option}"] = 3600 / secs
    finally:
        unload_subject_lora(pipe, "bench")
    generator = torch.Generator("cpu").manual_seed(0)
    theirs = timed(lambda: pipe("a photo of a dog on the beach", num_inference_steps=steps, guidance_scale=7.5, height=size,
                                width=size, num_images_per_prompt=images, generator=generator), repeats) / images
    row.update(sample_images_per_hour=3600 / ours, diffusers_images_per_hour=3600 / theirs, guidance_cost=ours / theirs)
    return row


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"| model | dtype | train s/step (res) | min/subject ({DEFAULT_TRAIN_STEPS} steps) | train peak GiB | sample img/h (size, steps) "
             "| diffusers CFG img/h | guidance cost | sample peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} ({r['mixed_precision']}) | {f(r['train_s_per_step'], '.3f')} ({r['train_res']}) "
                     f"| {f(r['train_min_per_subject'], '.1f')} | {f(r['train_peak_gib'], '.1f')} "
                     f"| {f(r['sample_images_per_hour'], '.0f')} ({r['size']} px, {r['steps']}) | {f(r['diffusers_images_per_hour'], '.0f')} "
                     f"| {f(r['guidance_cost'], '.2f')} | {f(r['sample_peak_gib'], '.1f')} |")
    opts = [o for o in OPTIONS if any(f"img_h_{o}" in r for r in rows)]
    if opts:
        lines += ["", "| model | dtype | sample img/h (4 per loop, SDPA) | " + " | ".join(OPTION_LABELS[o] for o in opts) + " |",
                  "|---|---|---|" + "---|" * len(opts)]
        for r in rows:
            cells = [f"{f(r.get(f'img_h_{o}'), '.0f')} ({r.get(f'img_h_{o}', 0) / r['sample_images_per_hour']:.2f}x)"
                     if r.get(f"img_h_{o}") else "-" for o in opts]
            lines.append(f"| {r['model']} | {r['dtype']} | {f(r['sample_images_per_hour'], '.0f')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


OPTION_LABELS = {"batch1": "1 image per loop", "channels_last": "+ channels-last", "classic_attention": "classic attention (no SDPA)",
                 "compile": "+ torch.compile (channels-last)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (what CI runs)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="where the model folders are built (default: a temp dir)")
    ap.add_argument("--dtypes", default=None, help="comma-separated (default: float16,bfloat16 on CUDA; float32,bfloat16 on CPU)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--options", default=None,
                    help=f"comma-separated speed options to time (of {','.join(OPTIONS)}; default: all on CUDA, batch1,channels_last in --smoke)")
    ap.add_argument("--options-dtype", default=None, help="time the options on this dtype's rows only (default: bfloat16 on CUDA, every row in --smoke)")
    ap.add_argument("--models", default=None, help=f"comma-separated architectures (default: all of {', '.join(m[1] for m in FULL)})")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke for the reduced CPU version", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dtypes = (args.dtypes or ("float16,bfloat16" if cuda else "float32,bfloat16")).split(",")
    models = SMOKE if args.smoke else FULL
    if args.models:
        wanted = args.models.split(",")
        if unknown := sorted(set(wanted) - {m[1] for m in models}):
            print(f"unknown --models {unknown}; choose from {', '.join(m[1] for m in models)}", file=sys.stderr)
            return 2
        models = [m for m in models if m[1] in wanted]
    options_dtype = args.options_dtype or (None if args.smoke else "bfloat16")
    train_steps = args.train_steps or (2 if args.smoke else 16)
    repeats = args.repeats or (1 if args.smoke else 2)
    options = tuple(o for o in (args.options or (",".join(OPTIONS) if cuda else "batch1,channels_last")).split(",") if o)
    if unknown := [o for o in options if o not in OPTIONS]:
        print(f"unknown --options {unknown}; choose from {', '.join(OPTIONS)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = []
        for name, arch, train_res, size, steps in models:
            folder = build(arch, work)
            for dtype in dtypes:
                row_started = time.perf_counter()
                row_options = options if options_dtype in (None, dtype) else ()
                rows.append(run_one(name, folder, dtype, device, train_res, size, steps, train_steps=train_steps,
                                    images=args.images, repeats=repeats, work=work, options=row_options))
                rows[-1]["row_seconds"] = time.perf_counter() - row_started
                if cuda:  # the pipeline of that row is gone: give its memory back before the next
                    torch.cuda.empty_cache()
                print(table(rows[-1:]).splitlines()[2], flush=True)
                text = write_results(args.out, rows, started, smoke=args.smoke)
    print(text)
    return 0


def write_results(out: Path, rows: list[dict], started: float, *, smoke: bool) -> str:
    """gpu_suite.md and gpu_suite.json with the rows so far (rewritten after each row)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    header = f"GPU suite on {gpu}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s" + (" (smoke)" if smoke else "")
    text = f"{header}\n\n{table(rows)}\n"
    (out / "gpu_suite.md").write_text(text)
    (out / "gpu_suite.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return text


if __name__ == "__main__":
    raise SystemExit(main())
