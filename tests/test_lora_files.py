"""LoRA files that reload whole: the diffusers-layout file round-trips every module for every
target set (through diffusers' own loader and through ``load_subject_lora``), a file whose modules do
not all apply is refused, and the kohya file carries the base-model metadata A1111 reads."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from test_lora_export import unet_out

from prcore.method.adapters import lora_layers
from prcore.method.lora_io import LoraMismatchError, file_lora_modules, injected_modules, load_subject_lora, save_lora
from prcore.method.models import load_pipeline
from prcore.store.keys import LORA_KOHYA_FILE, LORA_WEIGHTS_FILE

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
EVERYTHING = ATTENTION + ("ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out",
                          "time_emb_proj", "time_embedding.linear_1", "time_embedding.linear_2")
TARGET_SETS = {"attention": ATTENTION, "attention+ff+conv": ATTENTION + ("ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut"),
               "everything": EVERYTHING}


def fresh(path):
    return load_pipeline(path, device="cpu", dtype="float32", cache=False)


def with_random_lora(pipe, targets, name="src", seed=0):
    """``pipe`` with a LoRA (rank 4, alpha 2: alpha != rank) whose A and B are random and non-zero."""
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=list(targets), init_lora_weights="gaussian"), adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(pipe.unet):
            for weight in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.2)
    return pipe


def lora_weights(unet, adapter):
    out = {}
    layers = {id(m) for m in lora_layers(unet)}
    for name, module in unet.named_modules():
        if id(module) in layers and adapter in module.lora_A:
            out[name] = (module.lora_A[adapter].weight.detach().clone(), module.lora_B[adapter].weight.detach().clone(),
                         module.scaling[adapter])
    return out


@pytest.mark.parametrize("targets", list(TARGET_SETS))
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_file_reloads_every_module(kind, targets, request, tmp_path):
    path = request.getfixturevalue(f"tiny_{kind}_path")
    src = with_random_lora(fresh(path), TARGET_SETS[targets])
    saved = lora_weights(src.unet, "src")
    assert len(saved) > 0 and all(w[1].abs().sum() > 0 for w in saved.values())
    expected_out = unet_out(src)
    save_lora(src, tmp_path, "src")
    with safe_open(str(tmp_path / LORA_WEIGHTS_FILE), "pt") as f:  # one key layout: peft's, under unet.
        assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in f.keys())

    for via in ("diffusers", "prcore"):
        pipe = fresh(path)
        base_out = unet_out(pipe)
        if via == "diffusers":
            pipe.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHTS_FILE, adapter_name="x")
        else:
            load_subject_lora(pipe, tmp_path, "x")
        loaded = lora_weights(pipe.unet, "x")
        assert set(loaded) == set(saved), f"{via}: {len(set(saved) - set(loaded))} of {len(saved)} modules dropped"
        for name, (a, b, scale) in saved.items():
            torch.testing.assert_close(loaded[name][0], a, rtol=0, atol=0)
            torch.testing.assert_close(loaded[name][1], b, rtol=0, atol=0)
            assert loaded[name][2] == pytest.approx(scale) == 0.5  # alpha / rank
        out = unet_out(pipe)
        assert (out - base_out).abs().max() > 1e-3
        torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key, module", [
    ("unet.mid_block.attentions.0.proj_in.lora_A.weight", ("unet", "mid_block.attentions.0.proj_in")),
    ("unet.a.attn1.to_out.0.lora.up.weight", ("unet", "a.attn1.to_out.0")),
    ("unet.a.attn1.processor.to_out_lora.down.weight", ("unet", "a.attn1.to_out.0")),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
     ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")),
    ("down_blocks.0.resnets.0.conv1.lora_B.weight", ("", "down_blocks.0.resnets.0.conv1")),
])
def test_file_modules_read_every_key_layout(key, module):
    assert file_lora_modules({key: None}, ("unet", "text_encoder", "text_encoder_2")) == {module[0]: {module[1]}}


def old_prcore_file(pipe, folder, adapter):
    """The diffusers-layout file as prcore wrote it before: diffusers' converter applied to peft's keys
    (attention projections renamed ``.lora.down`` / ``.lora.up``, every other module left as peft's)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    metadata = pipe.unet.peft_config[adapter].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    type(pipe).save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=adapter)),
                                 unet_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHTS_FILE, safe_serialization=True)


def test_old_attention_only_file_still_loads_whole(tiny_sd_path, tmp_path):
    src = with_random_lora(fresh(tiny_sd_path), ATTENTION)
    old_prcore_file(src, tmp_path, "src")
    with safe_open(str(tmp_path / LORA_WEIGHTS_FILE), "pt") as f:
        assert all(".lora.down." in k or ".lora.up." in k for k in f.keys())  # the old layout indeed
    pipe = fresh(tiny_sd_path)
    load_subject_lora(pipe, tmp_path, "x")
    assert set(lora_weights(pipe.unet, "x")) == set(lora_weights(src.unet, "src"))
    torch.testing.assert_close(unet_out(pipe), unet_out(src), rtol=1e-5, atol=1e-5)


def test_mixed_layout_file_is_refused_not_half_loaded(tiny_sd_path, tmp_path):
    """Such a file from an earlier prcore loads with its attention modules dropped (diffusers reads the
    layout from the first key, here ``proj_in.lora_A``): refused with the count, not used."""
    src = with_random_lora(fresh(tiny_sd_path), EVERYTHING)
    old_prcore_file(src, tmp_path, "src")
    n_modules = len(lora_weights(src.unet, "src"))
    n_attention = sum(1 for name in lora_weights(src.unet, "src") if name.endswith(ATTENTION))
    pipe = fresh(tiny_sd_path)
    with pytest.raises(LoraMismatchError, match=rf"{n_attention} of its {n_modules} LoRA modules did not apply.*mixes two key layouts.*train the subject again"):
        load_subject_lora(pipe, tmp_path, "x")
    assert not injected_modules(pipe.unet, "x") and "x" not in getattr(pipe.unet, "peft_config", {})  # nothing half-loaded stays


def test_lora_of_another_base_model_is_refused(tiny_sd_path, tiny_sdxl_path, tmp_path):
    save_lora(with_random_lora(fresh(tiny_sd_path), EVERYTHING), tmp_path, "src")
    pipe = fresh(tiny_sdxl_path)
    base_out = unet_out(pipe)
    with pytest.raises(LoraMismatchError, match="another base model"):
        load_subject_lora(pipe, tmp_path, "x")
    assert not injected_modules(pipe.unet, "x")
    torch.testing.assert_close(unet_out(pipe), base_out, rtol=0, atol=0)


# -- the kohya file's metadata as A1111 reads it ---------------------------------------------------


def a1111_sd_version(metadata: dict[str, str]) -> str:
    """A1111's ``extensions-builtin/Lora/network.py`` ``NetworkOnDisk.detect_version``, restated."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def sd2_like(tiny_sd_path, prediction_type="epsilon"):
    """The tiny SD with SD 2.x's text width: an OpenCLIP-H-wide (1024) text encoder and cross-attention."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = fresh(tiny_sd_path)
    te = pipe.text_encoder.config.to_dict()
    te.update(hidden_size=1024, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, hidden_act="gelu")
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**te))
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 1024})
    pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "prediction_type": prediction_type})
    return pipe


@pytest.mark.parametrize("case, version, v2, a1111", [
    ("sd", "sd_v1", "False", "SD1"),
    ("sd2", "sd_v2", "True", "SD2"),
    ("sd2-v", "sd_v2_v", "True", "SD2"),
    ("sdxl", "sdxl_base_v1-0", "False", "SDXL"),
])
def test_kohya_metadata_names_the_base_model_as_a1111_reads_it(case, version, v2, a1111, tiny_sd_path, tiny_sdxl_path, tmp_path):
    if case.startswith("sd2"):
        pipe = sd2_like(tiny_sd_path, "v_prediction" if case == "sd2-v" else "epsilon")
    else:
        pipe = fresh(tiny_sdxl_path if case == "sdxl" else tiny_sd_path)
    with_random_lora(pipe, ATTENTION)
    save_lora(pipe, tmp_path, "src")
    with safe_open(str(tmp_path / LORA_KOHYA_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == version and meta["ss_v2"] == v2
    assert a1111_sd_version(meta) == a1111
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4", "2.0")
