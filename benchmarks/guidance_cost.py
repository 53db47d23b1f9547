"""What three-prediction guidance costs next to diffusers' own CFG sampler.

On a tiny pipeline (built locally; nothing downloaded; ``--family sd`` or ``sd3``) or a full-size
folder of any family, with the same steps, size, batch and seeds, it times

    ours      prcore.method.sampler.sample(guidance="parallel_rescaled"): one batched denoiser forward
              of 3 * batch rows per step, the LoRA routed to the personal rows only
    two-call  the same sampler with batch_mode="separate": a 2 * batch pretrained forward plus a
              1 * batch LoRA forward per step, as DCO's published sampler does
    diffusers the family's own pipeline __call__ (StableDiffusionPipeline, StableDiffusion3Pipeline, ...)
              with CFG (2 * batch rows per step) on the base model
    pretrained  sample(guidance="pretrained") on the base model: the same 2-row CFG loop as
              diffusers, so its ratio shows the sampler's own bookkeeping cost

and prints time(ours) / time(diffusers) and time(two-call) / time(diffusers). The floor is 1.5
(three UNet evaluations instead of two). Medians over --repeats runs after a warm-up, runs
interleaved so that machine load drifts hit all three alike. By default the clock is the process's
CPU time with one torch thread, which other jobs on a shared machine do not inflate; --clock wall
measures elapsed time (use it on a quiet machine or a GPU-less dedicated host).
Last line: guidance_cost_ratio=<x>.

    python benchmarks/guidance_cost.py [--steps 20] [--size 64] [--batch 1] [--repeats 7] [--threads 1] [--clock cpu|wall]

At full size (a folder written by ``python -m prcore.method.full_size sd15 DIR``):

    python benchmarks/guidance_cost.py --model DIR            # 512 px, 2 DDIM steps, 3 repeats, ours vs diffusers: ~6 min
    python benchmarks/guidance_cost.py --model SD35M_DIR --size 256 --steps 4   # SD3.5 Medium: flow-matching Euler

Both samplers stop at the latents (no VAE decode: the decode is the same for both and would hide
the guidance's cost), use the same named scheduler, and the figure is per denoising step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _random_lora(pipe, name: str, seed: int = 0) -> None:
    from peft import LoraConfig

    from prcore.method.families import family_of

    denoiser = family_of(pipe).denoiser(pipe)
    denoiser.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    for pname, param in denoiser.named_parameters():
        if "lora_B" in pname:
            param.data = (torch.randn(param.shape, generator=gen) * 0.1).to(param.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 2 with --model)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 64; the model's with --model)")
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 7; 3 with --model)")
    parser.add_argument("--scheduler", default=None, help="scheduler of both samplers (prcore's names; default ddim, "
                        "euler for a flow-matching model)")
    parser.add_argument("--family", choices=("sd", "sd3"), default="sd", help="the tiny pipeline's family (without --model)")
    parser.add_argument("--dtype", default="float32", help="weights' dtype (bfloat16 where the CPU has it natively)")
    parser.add_argument("--freeze-baseline", action="store_true",
                        help="requires_grad=False on diffusers' pipeline too, as on any pipeline with a peft LoRA loaded: on a CPU, "
                        "torch's linear then takes a slower path for non-contiguous inputs (SD3's joint-attention slices), "
                        "so only a frozen baseline compares like with like there")
    parser.add_argument("--variants", default=None,
                        help="comma-separated of ours,two_call,pretrained,diffusers (default: all; ours,diffusers with --model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine; pair with --threads 1); wall: elapsed time")
    parser.add_argument("--model", type=Path, default=None, help="a pipeline folder (default: build the tiny SD one)")
    parser.add_argument("--consistency-start", type=float, default=None, help="consistency window start (default: the product default)")
    parser.add_argument("--consistency-stop", type=float, default=None, help="consistency window end (default: the product default)")
    args = parser.parse_args()
    from prcore.data.schema import GenerationDefaults

    window = dict(consistency_start=GenerationDefaults().consistency_start if args.consistency_start is None else args.consistency_start,
                  consistency_stop=GenerationDefaults().consistency_stop if args.consistency_stop is None else args.consistency_stop)
    full = args.model is not None
    args.steps = args.steps or (2 if full else 20)
    args.repeats = args.repeats or (3 if full else 7)
    variants = (args.variants or ("ours,diffusers" if full else "ours,two_call,pretrained,diffusers")).split(",")

    torch.set_num_threads(args.threads)
    from prcore.method.families import family_of
    from prcore.method.models import load_pipeline
    from prcore.method.sampler import image_seeds, sample
    from prcore.method.tiny import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_pipeline(Path(tmp) / f"tiny-{args.family}", args.family, sample_size=(args.size or 64) // 4)
        base = load_pipeline(model, device="cpu", dtype=args.dtype, cache=False)
        personal = load_pipeline(model, device="cpu", dtype=args.dtype, cache=False)
        family = family_of(base)
        noise = family.noise_process(base)
        args.scheduler = args.scheduler or ("ddim" if "ddim" in noise.scheduler_names else "euler")
        args.size = args.size or family.default_resolution(base)
        base.scheduler = noise.scheduler(args.scheduler, base.scheduler.config)  # diffusers' loop, the same scheduler
        if args.freeze_baseline:
            family.denoiser(base).requires_grad_(False)
        _random_lora(personal, "subject")
        seeds = image_seeds(0, args.batch)
        common = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="latent")

        def ours(mode: str):
            return lambda: sample(personal, prompt="a photo of {subject} in the snow", class_noun="dog", identifier="sks",
                                  adapter_name="subject", seed=seeds, num_images=args.batch, progress=False,
                                  batch_mode=mode, scheduler=args.scheduler, **window, **common)

        def diffusers_cfg():
            return base("a photo of dog in the snow", guidance_scale=7.5, num_images_per_prompt=args.batch,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], **common)

        def ours_pretrained():  # same loop, two rows, no LoRA: isolates the sampler's own overhead
            return sample(base, prompt="a photo of {subject} in the snow", class_noun="dog", identifier="sks", adapter_name=None,
                          guidance="pretrained", seed=seeds, num_images=args.batch, progress=False, scheduler=args.scheduler, **common)

        every = {"ours": ours("batched"), "two_call": ours("separate"), "pretrained": ours_pretrained, "diffusers": diffusers_cfg}
        runs = {k: every[k] for k in variants}
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for key, fn in runs.items():
                start = clock()
                fn()
                times[key].append(clock() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model={args.model or 'tiny-' + args.family} dtype={args.dtype} frozen_baseline={args.freeze_baseline} torch {torch.__version__}, threads={args.threads}, steps={args.steps}, size={args.size}, "
          f"batch={args.batch}, scheduler={args.scheduler}, repeats={args.repeats}, clock={args.clock}, decode excluded, "
          f"window [{window['consistency_start']:g}, {window['consistency_stop']:g})")
    for key, value in med.items():
        spread = max(times[key]) - min(times[key])
        print(f"{key:10s} median {value * 1000 / args.steps:9.1f} ms/step  (min {min(times[key]) * 1000 / args.steps:.1f}, spread {spread * 1000 / args.steps:.1f})")
    if "pretrained" in med:
        print(f"pretrained_mode_ratio={med['pretrained'] / med['diffusers']:.3f}  (same 2-row CFG loop as diffusers: sampler overhead)")
    low = {k: min(v) for k, v in times.items()}
    print(f"min_based: guidance_cost_ratio={low['ours'] / low['diffusers']:.3f}"
          "  (fastest runs: less sensitive to other jobs on a shared machine)")
    if "two_call" in med:
        print(f"two_call_ratio={med['two_call'] / med['diffusers']:.3f}")
    print(f"guidance_cost_ratio={med['ours'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()
