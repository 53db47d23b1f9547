"""The CUDA-only paths, on a real GPU (skipped where there is none: CI has none).

`benchmarks/gpu_check.sh` runs this module on the lent GPU. Each check writes the figures it measured
to ``$PRCORE_CUDA_REPORT`` (one JSON line per check) when that is set, so a failed tolerance still
says by how much. What is checked, and the tolerance where one applies:

- a DCO step in bf16 and in fp16 (autocast + GradScaler; fp16 also with fp32 weights) gives finite
  losses and a finite, non-zero LoRA, and the record says which precision ran;
- the sampler's images on CUDA match the CPU's for the same seed (fp32 both; TF32 convolutions, the
  CUDA default, allowed): mean |diff| <= 0.01 and max |diff| <= 0.1 on the [0, 1] pixel scale;
- channels-last and ``torch.compile`` (inductor) with per-row LoRA routing draw the same latents as
  eager: max |diff| <= 1e-3 (fp32 with TF32 off; with TF32, CUDA's default for convolutions, another
  memory layout picks other TF32 kernels: 0.014 on these latents, measured on the H200);
- per-row LoRA routing adds no host-device synchronisation to a UNet forward (peft's own
  ``adapter_names`` path adds three per LoRA layer, 96 in the tiny UNet: the defect the first GPU
  run found);
- ``max_batch_rows`` bounds the sampler's activation memory (peak above the weights; the full-size
  SD 1.5 at 512 px where the GPU check built it) and leaves the images unchanged (tiny model, fp32,
  TF32 off); the sampler's peak is its own call's, not the process' (training ran before).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sampler import ADAPTER, save_random_lora

from prcore.data.schema import TrainConfig
from prcore.method.accel import DenoiserOptions, configure_denoiser
from prcore.method.adapters import BASE, lora_layers, per_sample_adapters, use_adapter
from prcore.method.dco import train_subject_lora
from prcore.method.models import load_pipeline
from prcore.method.sampler import sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs it on a GPU)")

PROMPT = "a photo of {subject} in the snow"
PIXEL_MEAN_TOL, PIXEL_MAX_TOL = 0.01, 0.1
COMPILE_TOL = 1e-3


def report(check: str, **figures) -> None:
    line = json.dumps({"check": check, **figures}, default=str)
    print(line)
    if path := os.environ.get("PRCORE_CUDA_REPORT"):
        with open(path, "a") as fh:
            fh.write(line + "\n")


def references(n: int = 3, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def lora_pipe(path: Path, lora_dir: Path, device: str, dtype: str = "float32"):
    if not (lora_dir / "pytorch_lora_weights.safetensors").is_file():
        save_random_lora(path, lora_dir)
    pipe = load_pipeline(path, device=device, dtype=dtype, cache=False)
    pipe.load_lora_weights(str(lora_dir), adapter_name=ADAPTER, use_safetensors=True)
    return pipe


@contextlib.contextmanager
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def draw(pipe, **kw):
    args = dict(prompt=PROMPT, class_noun="dog", identifier="sks", adapter_name=ADAPTER, num_inference_steps=4,
                height=64, width=64, seed=7, num_images=2, progress=False, output_type="np")
    args.update(kw)
    return sample(pipe, **args)


@pytest.mark.parametrize(("kind", "dtype", "mixed", "expected"), [
    ("sd", "bfloat16", "auto", "bf16"),
    ("sd", "float16", "auto", "fp16"),  # fp16 weights: autocast fp16 + GradScaler
    ("sd", "float32", "fp16", "fp16"),  # fp32 weights, fp16 autocast: the GradScaler path users ask for
    ("sdxl", "bfloat16", "auto", "bf16"),  # SDXL's micro-conditioning on the device
])
def test_dco_steps_in_half_precision_give_a_finite_nonzero_lora(kind, dtype, mixed, expected, tiny_sd_path, tiny_sdxl_path, tmp_path):
    from safetensors.torch import load_file

    pipe = load_pipeline(tiny_sd_path if kind == "sd" else tiny_sdxl_path, device="cuda", dtype=dtype, cache=False)
    config = TrainConfig(steps=8, rank=4, resolution=64, mixed_precision=mixed, learning_rate=1e-3)
    result = train_subject_lora(pipe, images=references(), class_noun="dog", identifier="sks", out_dir=tmp_path / "lora",
                                config=config, progress=False)
    weights = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    b_max = max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k or "lora.up" in k)
    report("dco_half_precision", kind=kind, dtype=dtype, mixed=result.record["mixed_precision_used"], losses=result.losses,
           lora_b_max=b_max, peak_bytes=result.record["peak_memory_bytes"], s_per_step=result.seconds_per_step)
    assert result.record["mixed_precision_used"] == expected
    assert result.record["device"].startswith("cuda") and result.record["peak_memory_kind"] == "cuda_max_memory_allocated"
    assert result.record["peak_memory_bytes"] > 0
    assert all(np.isfinite(result.losses))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert b_max > 0, "the LoRA never moved: every optimizer step was skipped (GradScaler) or had no gradient"


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_sampler_on_cuda_matches_the_cpu(kind, tiny_sd_path, tiny_sdxl_path, tmp_path):
    path = tiny_sd_path if kind == "sd" else tiny_sdxl_path
    cpu = draw(lora_pipe(path, tmp_path / "lora", "cpu")).images
    cuda = draw(lora_pipe(path, tmp_path / "lora", "cuda")).images
    diff = np.abs(np.asarray(cpu, dtype=np.float64) - np.asarray(cuda, dtype=np.float64))
    report("cuda_vs_cpu", kind=kind, mean_abs=float(diff.mean()), max_abs=float(diff.max()),
           tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    assert diff.mean() <= PIXEL_MEAN_TOL and diff.max() <= PIXEL_MAX_TOL


@no_tf32()
def test_channels_last_and_compile_with_lora_routing_match_eager(tiny_sd_path, tmp_path):
    pipe = lora_pipe(tiny_sd_path, tmp_path / "lora", "cuda")
    kw = dict(output_type="latent", num_images=3)
    eager = draw(pipe, **kw)
    assert eager.batch_mode == "batched"  # LoRA rows and base rows in one forward: peft's per-sample routing
    configure_denoiser(pipe, DenoiserOptions(channels_last=True))
    nhwc = draw(pipe, **kw).images
    configure_denoiser(pipe, DenoiserOptions(channels_last=True, compile=True))
    compiled = draw(pipe, **kw).images
    again = draw(pipe, **kw).images  # the compiled graph reused
    d_nhwc = float((nhwc - eager.images).abs().max())
    d_compiled = float((compiled - eager.images).abs().max())
    report("compile_channels_last", max_abs_channels_last=d_nhwc, max_abs_compile=d_compiled,
           max_abs_compile_rerun=float((again - compiled).abs().max()))
    assert d_nhwc <= COMPILE_TOL and d_compiled <= COMPILE_TOL
    assert torch.allclose(again, compiled, atol=1e-5)


def _count_syncs(forward) -> int:
    """Host-device synchronisations during ``forward()`` (CUDA's sync debug mode, one warning each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _peft_adapter_names(module, args, kwargs, *, names):  # what the routing did before the GPU run
    kwargs["adapter_names"] = names
    return args, kwargs


@torch.no_grad()
def test_per_row_lora_routing_adds_no_synchronisation(tiny_sd_path, tmp_path):
    pipe = lora_pipe(tiny_sd_path, tmp_path / "lora", "cuda")
    unet = pipe.unet
    cfg = unet.config
    x = torch.randn(4, cfg.in_channels, 8, 8, device="cuda")
    t = torch.tensor(10, device="cuda")
    emb = torch.randn(4, 7, cfg.cross_attention_dim, device="cuda")
    names = [BASE, ADAPTER, BASE, ADAPTER]

    def forward():
        return unet(x, t, encoder_hidden_states=emb).sample

    use_adapter(unet, BASE)
    forward()  # one-time work of a first forward (the GPU run counted 1 sync there) out of the counts
    plain = _count_syncs(forward)
    with per_sample_adapters(unet, names):
        routed = _count_syncs(forward)
        out = forward()
    use_adapter(unet, ADAPTER)
    handles = [layer.register_forward_pre_hook(partial(_peft_adapter_names, names=names), with_kwargs=True)
               for layer in lora_layers(unet)]
    try:
        peft = _count_syncs(forward)
        reference = forward()
    finally:
        for h in handles:
            h.remove()
    report("routing_syncs", plain=plain, routed=routed, peft_adapter_names=peft, lora_layers=len(lora_layers(unet)),
           max_abs_vs_peft=float((out - reference).abs().max()))
    assert routed <= plain
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)  # the same rows get the same LoRA


def _model_for_memory(tiny_sd_path: Path) -> tuple[Path, int]:
    """The full-size SD 1.5 folder where the GPU check built it (real activation sizes), else the tiny one."""
    folder = os.environ.get("PRCORE_SD15_DIR")
    return (Path(folder), 512) if folder else (tiny_sd_path, 256)


ROWS_12 = dict(num_images=4, num_inference_steps=2, output_type="latent", consistency_start=0.0, consistency_stop=1.0)


def test_max_batch_rows_bounds_peak_memory(tiny_sd_path, tmp_path):
    """Activation memory (peak above the weights) with 12 UNet rows a step vs 3. The images of the two are
    compared on the tiny model (next test): the random-weight full-size UNet is chaotic (float64
    rounding differences of 3e-11 after its first block grow ~1000x per block to O(1) at its output,
    measured on the CPU), so any change of kernel or batch size changes its output entirely."""
    path, size = _model_for_memory(tiny_sd_path)
    pipe = lora_pipe(path, tmp_path / "lora", "cuda", "float16")
    kw = dict(height=size, width=size, **ROWS_12)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    act_all = draw(pipe, **kw).peak_memory_bytes - weights
    act_capped = draw(pipe, max_batch_rows=3, **kw).peak_memory_bytes - weights
    report("max_batch_rows_memory", model=str(path.name), size=size, weights_bytes=weights, activation_bytes_12_rows=act_all,
           activation_bytes_3_rows=act_capped, ratio=act_capped / act_all)
    assert act_capped < 0.6 * act_all


@no_tf32()
def test_max_batch_rows_keeps_the_images_on_cuda(tiny_sd_path, tmp_path):
    pipe = lora_pipe(tiny_sd_path, tmp_path / "lora", "cuda")
    a = draw(pipe, height=64, width=64, **ROWS_12).images
    b = draw(pipe, height=64, width=64, max_batch_rows=3, **ROWS_12).images
    d = float((a - b).abs().max())
    report("max_batch_rows_images", max_abs_latent_diff=d, latent_max_abs=float(a.abs().max()))
    assert d <= 1e-4


def test_sampler_peak_is_its_own_call(tiny_sd_path, tmp_path):
    pipe = lora_pipe(tiny_sd_path, tmp_path / "lora", "cuda")
    ballast = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")  # 2 GiB, as a training run before would leave a peak
    del ballast
    out = draw(pipe)
    report("sampler_peak", peak_bytes=out.peak_memory_bytes)
    assert 0 < out.peak_memory_bytes < 2**30
