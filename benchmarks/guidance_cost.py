"""What three-prediction guidance costs next to diffusers' own CFG sampler.

On the tiny SD pipeline (built locally; nothing downloaded), with the same steps, size, batch and
seeds, it times

    ours      prcore.method.sampler.sample(guidance="parallel_rescaled"): one batched UNet forward of
              3 * batch rows per step, the LoRA routed to the personal rows only
    two-call  the same sampler with batch_mode="separate": a 2 * batch pretrained forward plus a
              1 * batch LoRA forward per step, as DCO's published sampler does
    diffusers StableDiffusionPipeline.__call__ with CFG (2 * batch rows per step) on the base model
    pretrained  sample(guidance="pretrained") on the base model: the same 2-row CFG loop as
              diffusers, so its ratio shows the sampler's own bookkeeping cost

and prints time(ours) / time(diffusers) and time(two-call) / time(diffusers). The floor is 1.5
(three UNet evaluations instead of two). Medians over --repeats runs after a warm-up, runs
interleaved so that machine load drifts hit all three alike. By default the clock is the process's
CPU time with one torch thread, which other jobs on a shared machine do not inflate; --clock wall
measures elapsed time (use it on a quiet machine or a GPU-less dedicated host).
Last line: guidance_cost_ratio=<x>.

    python benchmarks/guidance_cost.py [--steps 20] [--size 64] [--batch 1] [--repeats 7] [--threads 1] [--clock cpu|wall]
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

    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    for pname, param in pipe.unet.named_parameters():
        if "lora_B" in pname:
            param.data = torch.randn(param.shape, generator=gen) * 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the tiny VAE factor is 4)")
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine; pair with --threads 1); wall: elapsed time")
    parser.add_argument("--model", type=Path, default=None, help="a pipeline folder (default: build the tiny SD one)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from prcore.method.models import load_pipeline
    from prcore.method.sampler import image_seeds, sample
    from prcore.method.tiny import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_pipeline(Path(tmp) / "tiny-sd", "sd", sample_size=args.size // 4)
        base = load_pipeline(model, device="cpu", dtype="float32", cache=False)
        personal = load_pipeline(model, device="cpu", dtype="float32", cache=False)
        _random_lora(personal, "subject")
        seeds = image_seeds(0, args.batch)
        common = dict(num_inference_steps=args.steps, height=args.size, width=args.size)

        def ours(mode: str):
            return lambda: sample(personal, prompt="a photo of {subject} in the snow", class_noun="dog", identifier="sks",
                                  adapter_name="subject", seed=seeds, num_images=args.batch, progress=False,
                                  batch_mode=mode, **common)

        def diffusers_cfg():
            return base("a photo of dog in the snow", guidance_scale=7.5, num_images_per_prompt=args.batch,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], **common)

        def ours_pretrained():  # same loop, two rows, no LoRA: isolates the sampler's own overhead
            return sample(base, prompt="a photo of {subject} in the snow", class_noun="dog", identifier="sks", adapter_name=None,
                          guidance="pretrained", seed=seeds, num_images=args.batch, progress=False, **common)

        runs = {"ours": ours("batched"), "two_call": ours("separate"), "pretrained": ours_pretrained, "diffusers": diffusers_cfg}
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
    print(f"torch {torch.__version__}, threads={args.threads}, steps={args.steps}, size={args.size}, batch={args.batch}, repeats={args.repeats}, clock={args.clock}")
    for key, value in med.items():
        spread = max(times[key]) - min(times[key])
        print(f"{key:10s} median {value * 1000:9.1f} ms  (min {min(times[key]) * 1000:.1f}, spread {spread * 1000:.1f})")
    print(f"pretrained_mode_ratio={med['pretrained'] / med['diffusers']:.3f}  (same 2-row CFG loop as diffusers: sampler overhead)")
    low = {k: min(v) for k, v in times.items()}
    print(f"min_based: guidance_cost_ratio={low['ours'] / low['diffusers']:.3f} two_call_ratio={low['two_call'] / low['diffusers']:.3f}"
          "  (fastest runs: less sensitive to other jobs on a shared machine)")
    print(f"two_call_ratio={med['two_call'] / med['diffusers']:.3f}")
    print(f"guidance_cost_ratio={med['ours'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()
