"""Mixed precision done right: fp32 trainable parameters, autocast by device, the identifier embedding
as its own fp32 parameter, the cached pipeline left byte-identical, and clear errors for combinations
that cannot work. bf16 weights run here on the CPU; CUDA's choices are checked through the decision
function (no GPU here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from prcore.data.schema import TrainConfig, TrainingInputError
from prcore.method.dco import resolve_precision, train_subject_lora
from prcore.method.lora_io import load_subject_lora, unload_subject_lora
from prcore.method.sampler import sample

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def state(module) -> dict[str, torch.Tensor]:
    """Every tensor of a module (peft keeps an emptied LoRA wrapper after its adapter is deleted: base_layer)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("requested", "weights", "bf16_ok", "expected"),
    [
        ("auto", torch.float16, True, "fp16"),  # fp16 weights: fp16 autocast + GradScaler
        ("auto", torch.bfloat16, True, "bf16"),
        ("auto", torch.float32, True, "bf16"),  # bf16 where the device supports it: the default
        ("auto", torch.float32, False, "fp16"),
        ("no", torch.float32, True, "no"),
        ("no", torch.float16, True, "fp16"),  # never pure fp16 training
        ("fp16", torch.float32, True, "fp16"),
    ],
)
def test_cuda_precision_choice(monkeypatch, requested, weights, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert resolve_precision(requested, CUDA, weights) == expected


def test_cuda_bf16_without_support_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(TrainingInputError, match="supports bfloat16"):
        resolve_precision("bf16", CUDA, torch.float32)


def test_cpu_precision_choice_and_errors():
    assert resolve_precision("auto", CPU, torch.float32) == "no"
    assert resolve_precision("auto", CPU, torch.bfloat16) == "bf16"
    assert resolve_precision("bf16", CPU, torch.float32) == "bf16"
    with pytest.raises(TrainingInputError, match="fp16 weights cannot train on cpu"):
        resolve_precision("auto", CPU, torch.float16)
    with pytest.raises(TrainingInputError, match="needs a CUDA device"):
        resolve_precision("fp16", CPU, torch.float32)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, native):
    import warnings

    from prcore.method import models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
        assert models.resolve_dtype("float32", "cpu") == torch.float32
    said = [str(w.message) for w in caught if "bfloat16" in str(w.message)]
    assert len(said) == (0 if native else 1) and (native or "--dtype float32" in said[0])


@pytest.fixture(scope="module")
def bf16_sd(tiny_sd_path):
    from prcore.method.models import load_pipeline

    return load_pipeline(tiny_sd_path, device="cpu", dtype="bfloat16", cache=False)


def test_bf16_training_with_learned_identifier_leaves_the_pipeline_byte_identical(bf16_sd, tmp_path):
    pipe = bf16_sd
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    before_te, before_unet, vocab = state(pipe.text_encoder), state(pipe.unet), len(pipe.tokenizer)
    cfg = TrainConfig(steps=3, rank=2, alpha=2.0, resolution=32, learning_rate=5e-2, train_text_embeddings=True)
    res = train_subject_lora(pipe, images=images(), class_noun="dog", identifier="<zq>", out_dir=tmp_path / "l",
                             config=cfg, progress=False)
    assert all(math.isfinite(x) for x in res.losses)
    assert res.record["mixed_precision_used"] == "bf16" and res.record["unet_dtype"] == "torch.bfloat16"
    # the cached pipeline is exactly as it was: every tensor of the text encoder and the UNet, the tokenizer
    after_te = state(pipe.text_encoder)
    assert after_te.keys() == before_te.keys() and all(torch.equal(after_te[k], before_te[k]) for k in before_te)
    after_unet = state(pipe.unet)
    assert after_unet.keys() == before_unet.keys() and all(torch.equal(after_unet[k], before_unet[k]) for k in before_unet)
    assert len(pipe.tokenizer) == vocab
    # the learned row is an fp32 parameter that moved away from its initialisation (the class noun's mean)
    from safetensors.torch import load_file

    row = load_file(str(res.out_dir / "learned_embeds.safetensors"))["<zq>"]
    assert row.dtype == torch.float32 and torch.isfinite(row).all()
    class_ids = pipe.tokenizer("dog", add_special_tokens=False).input_ids
    matrix = pipe.text_encoder.get_input_embeddings().weight
    init = matrix[class_ids].float().mean(0)
    assert (row[0] - init).abs().max() > 1e-3
    # the LoRA samples in bf16, and unloading restores the encoder again
    load_subject_lora(pipe, res.out_dir, "zq")
    try:
        out = sample(pipe, prompt="a {subject} in the snow", class_noun="dog", identifier="<zq>", adapter_name="zq",
                     num_inference_steps=2, height=32, width=32, output_type="np", progress=False)
        assert np.isfinite(np.asarray(out.images)).all()
    finally:
        unload_subject_lora(pipe, "zq")
    again = state(pipe.text_encoder)
    assert all(torch.equal(again[k], before_te[k]) for k in before_te) and len(pipe.tokenizer) == vocab


def test_trainable_parameters_are_fp32_while_weights_are_bf16(bf16_sd, tmp_path, monkeypatch):
    from prcore.method import dco

    seen = {}
    real = dco._make_optimizer

    def spy(name, groups, lr):
        seen["dtypes"] = {p.dtype for g in groups for p in g["params"]}
        return real(name, groups, lr)

    monkeypatch.setattr(dco, "_make_optimizer", spy)
    train_subject_lora(bf16_sd, images=images(seed=1), class_noun="dog", identifier="sks", out_dir=tmp_path / "l",
                       config=TrainConfig(steps=1, rank=2, resolution=32), progress=False)
    assert seen["dtypes"] == {torch.float32}


def test_impossible_combinations_are_one_clear_error(tiny_sd, tmp_path):
    with pytest.raises(TrainingInputError, match="bitsandbytes"):
        train_subject_lora(tiny_sd, images=images(), class_noun="dog", identifier="sks", out_dir=tmp_path / "a",
                           config=TrainConfig(steps=1, rank=2, resolution=32, optimizer="adamw8bit"), progress=False)
    with pytest.raises(TrainingInputError, match="needs a CUDA device"):
        train_subject_lora(tiny_sd, images=images(), class_noun="dog", identifier="sks", out_dir=tmp_path / "b",
                           config=TrainConfig(steps=1, rank=2, resolution=32, mixed_precision="fp16"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sdxl_trains_with_gradient_checkpointing_by_default(tiny_sdxl, tiny_sd, tmp_path):
    kw = dict(images=images(), class_noun="dog", identifier="sks", progress=False)
    xl = train_subject_lora(tiny_sdxl, out_dir=tmp_path / "xl", config=TrainConfig(steps=1, rank=2, resolution=32), **kw)
    sd = train_subject_lora(tiny_sd, out_dir=tmp_path / "sd", config=TrainConfig(steps=1, rank=2, resolution=32), **kw)
    assert xl.record["gradient_checkpointing_used"] is True and sd.record["gradient_checkpointing_used"] is False
    assert not tiny_sdxl.unet.is_gradient_checkpointing  # left as found
