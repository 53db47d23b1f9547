"""Single-file checkpoints (A1111 / civitai ``model.safetensors``), offline.

The checkpoints are written here from folders the tests build (``ldm_checkpoint.write_ldm_checkpoint``,
the original LDM key names). Fast tests cover the tokenizer prcore carries, the architecture read from
the keys, and every refusal; the slow ones load full-size SD 1.5 / SD 2.1 / SDXL checkpoints through
``load_pipeline`` (the path ``--model model.safetensors`` takes) and check every weight against the
folder it was written from (``tests/test_full_size.py`` samples from one through the CLI, with a LoRA).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from ldm_checkpoint import folder_tensors, write_ldm_checkpoint
from safetensors.torch import save_file
from typer.testing import CliRunner

from prcore.data.model_source import ModelSourceError, safetensors_keys, single_file_architecture, single_file_problem
from prcore.method.architectures import write_config_folder
from prcore.method.clip_tokenizer import CLIP_VOCAB_SIZE
from prcore.method.single_file import describe

A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # openai/clip-vit-large-patch14's ids


def header_only(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    """A small safetensors file with these tensor names (tiny shapes unless given)."""
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    return path


SD1_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (1,),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (1,)}
SD2_KEYS = {**{k: v for k, v in SD1_KEYS.items() if "cond_stage" not in k}, "cond_stage_model.model.token_embedding.weight": (1,)}


def test_carried_clip_tokenizer_is_openais(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_config_folder("sdxl", tmp_path / "xl")
    one, two = (CLIPTokenizer.from_pretrained(folder / t) for t in ("tokenizer", "tokenizer_2"))
    assert len(one) == CLIP_VOCAB_SIZE and one("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT
    assert one("sks").input_ids[1:-1] == [48136]  # DreamBooth's rare token is one token, as on the hub
    assert (one.pad_token_id, two.pad_token_id) == (49407, 0)  # SDXL: CLIP-L pads with END, bigG with "!"
    sd2 = CLIPTokenizer.from_pretrained(write_config_folder("sd21", tmp_path / "sd2") / "tokenizer")
    assert sd2.pad_token_id == 0 and sd2("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT


def test_config_folder_has_no_weights_and_the_sd2_base_variant(tmp_path):
    v = write_config_folder("sd21", tmp_path / "v")
    assert not list(v.rglob("*.safetensors"))
    assert json.loads((v / "unet" / "config.json").read_text())["sample_size"] == 96
    base = write_config_folder("sd21", tmp_path / "base", prediction_type="epsilon")  # 2.x-base: 512 px
    assert json.loads((base / "unet" / "config.json").read_text())["sample_size"] == 64
    assert json.loads((base / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"


def test_ldm_writer_round_trips_through_diffusers(tiny_sd_path, tmp_path):
    """The test helper itself: diffusers' own reader gives back every weight of the folder."""
    from diffusers import StableDiffusionPipeline

    ckpt = write_ldm_checkpoint(tiny_sd_path, tmp_path / "tiny.safetensors")
    assert single_file_architecture(safetensors_keys(ckpt)) == "sd15"
    a = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    b = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(tiny_sd_path), local_files_only=True, safety_checker=None)
    for component in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, component).state_dict(), getattr(b, component).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), component


def test_architecture_comes_from_the_keys_not_the_name(tiny_sdxl_path, tmp_path):
    xl = write_ldm_checkpoint(tiny_sdxl_path, tmp_path / "sd15-not-really.safetensors")
    assert single_file_architecture(safetensors_keys(xl)) == "sdxl"
    assert single_file_architecture(safetensors_keys(header_only(tmp_path / "xl-named.safetensors", SD2_KEYS))) == "sd21"


@pytest.mark.parametrize(("keys", "words"), [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (1,)}, "LoRA, not a base checkpoint"),
    ({"down_blocks.0.resnets.0.conv1.weight": (1,), "conv_in.weight": (1,)}, "diffusers-layout UNet"),
    ({k: v for k, v in SD1_KEYS.items() if "first_stage" not in k}, "no VAE"),
    ({"model.diffusion_model.x": (1,), "first_stage_model.x": (1,), "conditioner.embedders.0.model.ln_final.weight": (1,)}, "refiner"),
    ({"model.diffusion_model.x": (1,), "first_stage_model.x": (1,)}, "no text encoder"),
    ({**SD1_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3)}, "inpainting"),
])
def test_what_cannot_be_loaded_says_what_it_is(tmp_path, keys, words):
    problem = single_file_problem(header_only(tmp_path / "model.safetensors", keys))
    assert problem and words in problem


def test_pickles_and_broken_files_are_refused_without_reading_them(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04 not unpickled")
    assert "pickled" in single_file_problem(ckpt) and "safetensors" in single_file_problem(ckpt)
    huge = tmp_path / "huge.safetensors"  # a header length of 2**63: refused, nothing allocated
    huge.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    assert "does not fit" in single_file_problem(huge)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    assert "not JSON" in single_file_problem(junk)
    with pytest.raises(ModelSourceError, match="only 3 bytes"):
        safetensors_keys(tmp_path / "short.safetensors") if (tmp_path / "short.safetensors").write_bytes(b"abc") else None


def test_sd2_prediction_type_from_an_a1111_yaml(tmp_path):
    ckpt = header_only(tmp_path / "sd2.safetensors", SD2_KEYS)
    assert describe(ckpt) == ("sd21", "v_prediction")  # the 768 px release, when nothing says otherwise
    (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert describe(ckpt) == ("sd21", "epsilon")  # A1111: no parameterization means epsilon (2.x-base)
    (tmp_path / "sd2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert describe(ckpt) == ("sd21", "v_prediction")
    (tmp_path / "sd2.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ModelSourceError, match="not valid YAML"):
        describe(ckpt)


def test_cli_refuses_a_pickle_before_any_work(tmp_path):
    from prcore.cli import build_app

    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    out = tmp_path / "out"
    result = CliRunner().invoke(build_app("sample"), ["sample", "--model", str(tmp_path / "model.ckpt"), "--guidance", "pretrained", "--prompt", "a {subject}",
                                                      "--class-noun", "dog", "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "pickled" in result.output and "Traceback" not in result.output and not out.exists()


# ---- full size: the real architectures, real key names, through the path a user takes ----

@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("name", "size", "prediction", "dtype", "family", "encoders"), [
    ("sd15", 512, "epsilon", "float32", "StableDiffusionPipeline", ("text_encoder",)),
    ("sd21", 768, "v_prediction", "float32", "StableDiffusionPipeline", ("text_encoder",)),
    ("sdxl", 1024, "epsilon", "bfloat16", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2")),
])
def test_full_size_single_file_loads_every_weight(full_size_model, tmp_path, name, size, prediction, dtype, family, encoders):
    from prcore.method.models import load_pipeline

    folder = full_size_model(name)
    ckpt = write_ldm_checkpoint(folder, tmp_path / "model.safetensors", dtype=torch.float16)  # as most are published
    pipe = load_pipeline(ckpt, device="cpu", dtype=dtype, cache=False)
    ckpt.unlink()  # 2-7 GB: the disk is shared with the next full-size folder
    assert type(pipe).__name__ == family and pipe.scheduler.config.prediction_type == prediction
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == size
    assert pipe.tokenizer("a photo of a cat").input_ids == A_PHOTO_OF_A_CAT
    for component in ("unet", "vae", *encoders):
        state = getattr(pipe, component).state_dict()
        n = 0
        for key, ref in folder_tensors(folder, component):
            assert key in state, (component, key)
            assert state[key].dtype == getattr(torch, dtype)
            assert torch.equal(state[key], ref.half().to(state[key].dtype)), (component, key)  # fp16 in the file
            n += 1
        assert n == len(state), (component, n, len(state))
    del pipe
