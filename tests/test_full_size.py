"""The real architectures on the path a user takes: full-size SD 1.5, SD 2.1 (768 px, v-prediction)
and SDXL-base folders (random weights, built here by prcore.method.full_size), trained and sampled
through the `prcore` command in its own process, as a user runs it. Random weights draw noise; the
shapes, dtypes, conditioning, files and memory are the real ones. Peak memory is printed (and is
in training.json and every sidecar).

The half-precision runs use bf16 only where this CPU computes it natively (``cpu_has_native_bf16``);
elsewhere (AVX2) bf16 convolutions are ~145x slower than fp32 and these tests run fp32 instead. SD 2.1
(768 px native) trains and samples at 256 px here: the CPU time of 768 px does not fit the suite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_checkpoint import write_ldm_checkpoint
from PIL import Image
from safetensors import safe_open

from prcore.data.model_source import safetensors_keys
from prcore.method.models import cpu_has_native_bf16

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # full-size networks on a CPU: minutes each
PRCORE = [str(Path(sys.executable).with_name("prcore"))]  # the console script of this environment
HALF = "bfloat16" if cpu_has_native_bf16() else "float32"


def prcore(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([*PRCORE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def references(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def header_params(file: Path) -> int:
    """The number of parameters in a safetensors file, from its header alone (no weights read)."""
    return sum(math.prod(entry["shape"]) for key, entry in safetensors_keys(file).items() if key != "__metadata__")


@pytest.mark.parametrize(("name", "native", "size", "prediction", "unet_params", "dtype", "sample_from"), [
    # the CPU default, trained at the model's own 512 px; sampled at 256 px from a single-file checkpoint of the
    # same weights (fp16, as civitai publishes them) with the LoRA trained on the folder
    ("sd15", 512, 512, "epsilon", 859_520_964, "float32", "single-file"),
    ("sd21", 768, 256, "v_prediction", 865_910_724, HALF, "folder"),  # bf16 weights: autocast training, fp32 LoRA
])
def test_train_then_sample_through_the_cli(full_size_model, tmp_path, name, native, size, prediction, unet_params, dtype,
                                           sample_from):
    model = full_size_model(name)
    assert header_params(model / "unet" / "diffusion_pytorch_model.safetensors") == unet_params  # the published architecture
    assert json.loads((model / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction
    assert json.loads((model / "unet" / "config.json").read_text())["sample_size"] * 8 == native
    lora = tmp_path / "lora"
    resolution = [] if size == native else ["--resolution", size]
    prcore("train", "--model", model, "--images", references(tmp_path / "refs", size), "--class-noun", "dog",
           "--out", lora, "--train-steps", 2, "--rank", 4, "--device", "cpu", "--dtype", dtype, *resolution)
    record = json.loads((lora / "training.json").read_text())
    assert record["resolution"] == size and record["model_family"] == "sd" and len(record["losses"]) == 2
    assert record["mixed_precision_used"] == ("bf16" if dtype == "bfloat16" else "no")
    assert (lora / "lora_kohya.safetensors").is_file()
    base, px = model, size
    if sample_from == "single-file":
        base, px = write_ldm_checkpoint(model, tmp_path / "v1-5-pruned-emaonly.safetensors", dtype=torch.float16), 256
    out = tmp_path / "images"
    prcore("sample", "--model", base, "--lora", lora, "--prompt", "a {subject} in the snow", "--class-noun", "dog",
           "--out", out, "--num-inference-steps", 2, "--height", px, "--width", px, "--device", "cpu", "--dtype", dtype,
           "--no-progress")
    if base != model:
        base.unlink()  # 2 GB: the disk is shared with the next full-size folder
    png = sorted(out.glob("*.png"))
    sidecar = json.loads(png[0].with_suffix(".json").read_text())
    with Image.open(png[0]) as im:
        assert im.size == (px, px)
    assert (sidecar["height"], sidecar["width"], sidecar["dtype"], sidecar["device"]) == (px, px, dtype, "cpu")
    assert sidecar["base_model"] == str(base)
    print(f"\n{name}: training peak {record['peak_memory_bytes'] / 2**30:.1f} GiB at {size} px ({record['seconds_per_step']:.0f} s/step), "
          f"sampling peak {sidecar['peak_memory_bytes'] / 2**30:.1f} GiB at {px} px ({sidecar['seconds']:.0f} s/image, 2 steps)")
    weights = 859e6 * (4 if dtype == "float32" else 2)  # the UNet's weights alone
    assert record["peak_memory_bytes"] > weights and sidecar["peak_memory_bytes"] > weights


@pytest.mark.full_size("sdxl")
def test_sdxl_samples_at_512_in_half_precision(full_size_model, tmp_path):
    model = full_size_model("sdxl")
    out = tmp_path / "images"
    prcore("sample", "--model", model, "--guidance", "pretrained", "--prompt", "a {subject} in the snow", "--class-noun",
           "dog", "--out", out, "--num-inference-steps", 1, "--height", 512, "--width", 512, "--device", "cpu",
           "--dtype", HALF, "--no-progress")  # one step: SDXL's UNet in fp32 on a 2-core AVX2 CPU costs minutes
    png = sorted(out.glob("*.png"))
    sidecar = json.loads(png[0].with_suffix(".json").read_text())
    assert (sidecar["height"], sidecar["width"], sidecar["dtype"]) == (512, 512, HALF)
    assert not list(model.rglob("diffusion_pytorch_model.safetensors"))  # the folder ships only *.fp16.safetensors
    print(f"\nsdxl: sampling peak {sidecar['peak_memory_bytes'] / 2**30:.1f} GiB at 512 px {HALF} ({sidecar['seconds']:.0f} s/image, 1 step)")
    assert sidecar["peak_memory_bytes"] > 5e9  # the UNet's weights alone: 2.6e9 params x 2 (bf16) or 4 bytes


@pytest.mark.full_size("sd15")
def test_fp16_variant_files_are_complete(full_size_model):
    model = full_size_model("sd15")
    for component in ("unet", "vae", "text_encoder"):
        files = sorted(p.name for p in (model / component).glob("*.safetensors"))
        assert any(".fp16." in f for f in files) and any(".fp16." not in f for f in files), (component, files)


SD35M_TRANSFORMER_STORED = 2_469_663_936  # 2,243,171,520 trained + 226,492,416 fixed position embedding (384^2 x 1536)
SD35M_PARAMS = {"transformer": 2_243_171_520, "vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840}


@pytest.mark.full_size("sd35m")
def test_sd35_medium_folder_and_single_file_load_every_weight(full_size_model, tmp_path):
    """The exact SD 3.5 Medium architecture (MMDiT-X, random weights, T5 left out): its transformer has
    Stability's "2.5 billion parameters" (2.47 B stored) and the pipeline keras-hub's published count
    (SD3_PUBLISHED_PARAMS); written as one single file in the ComfyUI layout (fp16, as the folder) it
    loads through ``load_pipeline`` (the path ``--model sd3.5_medium.safetensors`` takes) with every
    weight equal. ~2 min here: ~70 s to build (10.5 GB peak), ~55 s for the rest (16 GB peak: bf16
    weights plus the file read whole by diffusers' single-file loader)."""
    from diffusers import StableDiffusion3Pipeline
    from ldm_checkpoint import folder_tensors
    from sd3_checkpoint import write_sd3_checkpoint

    from prcore.method.architectures import SD3_PUBLISHED_PARAMS
    from prcore.method.models import load_pipeline

    model = full_size_model("sd35m")
    assert sum(header_params(f) for f in (model / "transformer").glob("*.safetensors")) == SD35M_TRANSFORMER_STORED
    pipe = StableDiffusion3Pipeline.from_pretrained(model, variant="fp16", torch_dtype=torch.bfloat16, text_encoder_3=None,
                                                    tokenizer_3=None)
    counts = {c: sum(p.numel() for p in getattr(pipe, c).parameters()) for c in SD35M_PARAMS}
    assert counts == SD35M_PARAMS
    assert sum(counts.values()) + pipe.transformer.pos_embed.pos_embed.numel() == SD3_PUBLISHED_PARAMS["sd35m"]
    assert tuple(pipe.transformer.config.dual_attention_layers) == tuple(range(13)) and pipe.vae.config.latent_channels == 16
    del pipe
    ckpt = write_sd3_checkpoint(model, tmp_path / "sd3.5_medium_incl_clips.safetensors")
    loaded = load_pipeline(ckpt, device="cpu", dtype="bfloat16", cache=False)
    ckpt.unlink()  # 6.3 GB: the disk is shared with the next full-size folder
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and loaded.text_encoder_3 is None
    assert loaded._prcore_single_file == {"architecture": "sd35m", "prediction_type": "flow_matching"}
    for component in SD35M_PARAMS:
        state = getattr(loaded, component).state_dict()
        n = 0
        for key, ref in folder_tensors(model, component):
            assert torch.equal(state[key], ref.to(state[key].dtype)), (component, key)
            n += 1
        assert n == len(state), (component, n, len(state))


@pytest.mark.full_size("sd35m")
def test_sd35_medium_trains_and_samples_through_the_cli(full_size_model, tmp_path):
    """The exact SD 3.5 Medium architecture (T5 left out) through `prcore train` and `prcore sample` on the
    CPU at 128 px (1 DCO step, 1 flow-matching step: what fits the 2-core budget), in bf16 where the CPU has
    it: the transformer LoRA in both layouts, the flow scheduler in the sidecar, peaks reported."""
    model = full_size_model("sd35m")
    lora, out = tmp_path / "lora", tmp_path / "images"
    prcore("train", "--model", model, "--images", references(tmp_path / "refs", 128), "--class-noun", "dog", "--out", lora,
           "--train-steps", 1, "--rank", 4, "--resolution", 128, "--device", "cpu", "--dtype", HALF, "--no-progress")
    record = json.loads((lora / "training.json").read_text())
    assert record["model_family"] == "sd3" and record["resolution"] == 128 and len(record["losses"]) == 1
    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("transformer.") for k in keys) and any(".attn2." in k for k in keys)
    with safe_open(str(lora / "lora_kohya.safetensors"), framework="pt") as fh:
        assert all(k.startswith("lora_transformer_") for k in fh.keys()) and fh.metadata()["ss_base_model_version"] == "sd3.5_medium"
    prcore("sample", "--model", model, "--lora", lora, "--prompt", "a {subject} in the snow", "--class-noun", "dog",
           "--out", out, "--num-inference-steps", 1, "--height", 128, "--width", 128, "--device", "cpu", "--dtype", HALF,
           "--no-progress")
    png = sorted(out.glob("*.png"))
    sidecar = json.loads(png[0].with_suffix(".json").read_text())
    assert sidecar["scheduler"] == "FlowMatchEulerDiscreteScheduler" and (sidecar["height"], sidecar["dtype"]) == (128, HALF)
    print(f"\nsd35m: training peak {record['peak_memory_bytes'] / 2**30:.1f} GiB ({record['seconds_per_step']:.0f} s/step), "
          f"sampling peak {sidecar['peak_memory_bytes'] / 2**30:.1f} GiB ({sidecar['seconds']:.0f} s/image, 1 step, 3 rows)")
    assert record["peak_memory_bytes"] > SD35M_TRANSFORMER_STORED * 2  # at least the transformer's bf16 weights
