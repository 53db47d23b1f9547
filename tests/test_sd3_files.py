"""SD 3 / 3.5 single files (Stability's / ComfyUI's layout) and the published SD 3 / 3.5 configs, offline.

The single files are written here from tiny SD3 folders by ``sd3_checkpoint.write_sd3_checkpoint`` (the
original MMDiT key names, written independently of diffusers' reader). The tiny architecture is not a
published one, so the tests that load one through ``load_pipeline`` put its config folder beside the file
(``<stem>.config/``, configs and tokenizers, no weights), the way a user brings an unknown architecture.
The full-size SD 3.5 Medium file is loaded in ``tests/test_full_size.py`` (slow).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sd3_checkpoint import tiny_sd3_with_distinct_clips, write_sd3_checkpoint
from typer.testing import CliRunner

from prcore.data.model_source import safetensors_keys, sd3_has_t5, single_file_architecture, single_file_problem
from prcore.method.architectures import SD3_ARCHITECTURES, SD3_PUBLISHED_PARAMS, write_config_folder
from prcore.method.single_file import describe

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny SD3 folder with T5 (CLIP widths 24 / 40, CLIP-L projection the identity)."""
    return tiny_sd3_with_distinct_clips(tmp_path_factory.mktemp("sd3") / "tiny-sd3", with_t5=True)


@pytest.fixture(scope="module")
def tiny_sd3_no_t5(tmp_path_factory) -> Path:
    return tiny_sd3_with_distinct_clips(tmp_path_factory.mktemp("sd3") / "tiny-sd3-no-t5", with_t5=False)


def beside(folder: Path, ckpt: Path) -> Path:
    """Put ``folder``'s configs and tokenizers (not its weights) beside ``ckpt`` as ``<stem>.config/``."""
    return Path(shutil.copytree(folder, ckpt.with_name(ckpt.stem + ".config"), ignore=shutil.ignore_patterns("*.safetensors")))


def assert_same_weights(pipe, folder: Path, components) -> None:
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(folder, **({} if "text_encoder_3" in components else
                                                              {"text_encoder_3": None, "tokenizer_3": None}))
    for component in components:
        a, b = getattr(ref, component).state_dict(), getattr(pipe, component).state_dict()
        assert a.keys() == b.keys(), component
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, (component, unequal[:5])


def test_sd3_writer_round_trips_through_diffusers(tiny_sd3, tmp_path):
    """The test helper itself: diffusers' reader gives back every weight of the folder, T5 included."""
    from diffusers import StableDiffusion3Pipeline

    ckpt = write_sd3_checkpoint(tiny_sd3, tmp_path / "tiny.safetensors")
    pipe = StableDiffusion3Pipeline.from_single_file(str(ckpt), config=str(tiny_sd3), local_files_only=True)
    pipe.text_encoder_3.tie_weights()
    assert_same_weights(pipe, tiny_sd3, (*COMPONENTS, "text_encoder_3"))


@pytest.mark.parametrize("with_t5", [True, False])
def test_load_pipeline_reads_an_sd3_single_file(tiny_sd3, tiny_sd3_no_t5, tmp_path, with_t5):
    """``--model file.safetensors`` for SD3: a StableDiffusion3Pipeline with every weight of the file, T5
    when the file (and the configs beside it) have it, none otherwise; it samples."""
    from prcore.method.models import load_pipeline

    folder = tiny_sd3 if with_t5 else tiny_sd3_no_t5
    ckpt = write_sd3_checkpoint(folder, tmp_path / "sd3.5_tiny.safetensors")
    assert sd3_has_t5(safetensors_keys(ckpt)) is with_t5
    beside(folder, ckpt)
    pipe = load_pipeline(ckpt, device="cpu", dtype="float32", cache=False)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert (pipe.text_encoder_3 is not None) is with_t5 and (pipe.tokenizer_3 is not None) is with_t5
    assert pipe._prcore_single_file == {"architecture": "sd35m", "prediction_type": "flow_matching"}
    assert_same_weights(pipe, folder, (*COMPONENTS, *(["text_encoder_3"] if with_t5 else [])))
    latents = pipe("a dog", num_inference_steps=1, height=32, width=32, output_type="latent").images
    assert latents.shape == (1, 16, 8, 8) and torch.isfinite(latents).all()


def test_a_files_t5_without_a_tokenizer_is_left_out_and_said(tiny_sd3, tiny_sd3_no_t5, tmp_path, caplog):
    from prcore.method.models import load_pipeline

    ckpt = write_sd3_checkpoint(tiny_sd3, tmp_path / "with-t5.safetensors")
    beside(tiny_sd3_no_t5, ckpt)  # the configs beside it have no tokenizer_3
    with caplog.at_level(logging.WARNING, logger="prcore.method.single_file"):
        pipe = load_pipeline(ckpt, device="cpu", dtype="float32", cache=False)
    assert pipe.text_encoder_3 is None
    assert "T5-XXL encoder is left out" in caplog.text and "with-t5.config" in caplog.text


def test_an_unpublished_shape_is_refused_before_loading(tiny_sd3, tmp_path):
    from prcore.method.models import ModelNotFoundError, load_pipeline

    ckpt = write_sd3_checkpoint(tiny_sd3, tmp_path / "tiny.safetensors")
    with pytest.raises(ModelNotFoundError, match=r"2 blocks of width 16; SD 3.5 Medium has 24 of 1536.*tiny\.config/"):
        load_pipeline(ckpt, device="cpu", dtype="float32", cache=False)


def header_only(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    return path


MMDIT = "model.diffusion_model."
CLIPS = {"text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
         "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight": (77, 1280)}
SD3_BASE = {MMDIT + "x_embedder.proj.weight": (1536, 16, 2, 2), MMDIT + "joint_blocks.0.x_block.attn.qkv.weight": (1,),
            "first_stage_model.encoder.conv_in.weight": (1,), **CLIPS}


@pytest.mark.parametrize(("extra", "arch"), [
    ({MMDIT + "joint_blocks.12.x_block.attn2.qkv.weight": (1,), MMDIT + "joint_blocks.0.x_block.attn.ln_q.weight": (1,)}, "sd35m"),
    ({MMDIT + "joint_blocks.37.x_block.attn.ln_q.weight": (1,)}, "sd35l"),
    ({}, "sd3m"),
])
def test_sd3_architecture_comes_from_the_keys(tmp_path, extra, arch):
    ckpt = header_only(tmp_path / "sdxl-named.safetensors", {**SD3_BASE, **extra})
    assert single_file_architecture(safetensors_keys(ckpt)) == arch
    assert describe(ckpt) == (arch, "flow_matching") and single_file_problem(ckpt) is None


@pytest.mark.parametrize(("drop", "words"), [
    ("clip_g", "without its CLIP-G (text_encoders.clip_g.*) text encoder "),
    ("clip_", "without its CLIP-L (text_encoders.clip_l.*) and CLIP-G (text_encoders.clip_g.*) text encoders"),
    ("first_stage", "without a VAE"),
])
def test_an_sd3_file_without_clip_or_vae_says_what_is_missing(tmp_path, drop, words):
    ckpt = header_only(tmp_path / "sd3.5_medium.safetensors", {k: v for k, v in SD3_BASE.items() if drop not in k})
    problem = single_file_problem(ckpt)
    assert problem and words in problem and "\n" not in problem
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in problem  # what to use instead


def test_other_sd3_files_are_refused_with_what_they_are(tmp_path):
    alone = header_only(tmp_path / "mmdit.safetensors", {"joint_blocks.0.x_block.attn.qkv.weight": (1,)})
    assert "transformer alone" in single_file_problem(alone)
    lora = header_only(tmp_path / "lora.safetensors", {"lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight": (1,)})
    assert "LoRA, not a base checkpoint" in single_file_problem(lora)
    control = header_only(tmp_path / "c.safetensors", {**SD3_BASE, MMDIT + "x_embedder.proj.weight": (1536, 32, 2, 2)})
    assert "32 latent channels" in single_file_problem(control)


def test_cli_refuses_an_sd3_file_without_clip_before_any_work(tmp_path):
    from prcore.cli import build_app

    ckpt = header_only(tmp_path / "sd3.5_large.safetensors",
                       {k: v for k, v in SD3_BASE.items() if "clip" not in k} | {MMDIT + "joint_blocks.0.x_block.attn.ln_q.weight": (1,)})
    out = tmp_path / "out"
    result = CliRunner().invoke(build_app("sample"), ["sample", "--model", str(ckpt), "--guidance", "pretrained", "--prompt",
                                                      "a {subject}", "--class-noun", "dog", "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())  # however the terminal wraps it
    assert "SD 3.5 Large checkpoint without its CLIP-L" in said and "stabilityai/stable-diffusion-3.5-large" in said
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize("name", SD3_ARCHITECTURES)
def test_sd3_config_folders_are_the_published_architectures(tmp_path, name):
    """Built on the meta device from the folder's configs (no memory): transformer + CLIP-L + CLIP-bigG + VAE
    parameters are keras-hub's published counts, exactly; T5 is left out; the tokenizers pad as SD3's do."""
    import diffusers
    import transformers

    folder = write_config_folder(name, tmp_path / name)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not list(folder.rglob("*.safetensors"))
    total = 0
    with torch.device("meta"):
        for component in ("transformer", "vae"):
            cls = getattr(diffusers, index[component][1])
            module = cls.from_config(cls.load_config(folder / component))
            total += sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
        for component in ("text_encoder", "text_encoder_2"):
            module = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_pretrained(folder / component))
            total += sum(p.numel() for p in module.parameters())
    assert total == SD3_PUBLISHED_PARAMS[name]
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["shift_factor"], vae["scaling_factor"], vae["use_quant_conv"]) == (16, 0.0609, 1.5305, False)
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    one, two = (transformers.CLIPTokenizer.from_pretrained(folder / t) for t in ("tokenizer", "tokenizer_2"))
    assert (one.pad_token_id, two.pad_token_id) == (49407, 0)  # CLIP-L pads with END, bigG with "!"


def test_a_broken_config_folder_beside_the_file_is_refused(tiny_sd3, tmp_path):
    from prcore.method.models import ModelNotFoundError, load_pipeline

    ckpt = write_sd3_checkpoint(tiny_sd3, tmp_path / "m.safetensors")
    (tmp_path / "m.config").mkdir()
    with pytest.raises(ModelNotFoundError, match="m.config has no model_index.json"):
        load_pipeline(ckpt, device="cpu", dtype="float32", cache=False)


def test_sd3_prediction_type_cannot_be_chosen():
    with pytest.raises(ValueError, match="flow-matching"):
        write_config_folder("sd35m", "/nonexistent", prediction_type="epsilon")


def test_unknown_keys_in_the_writer_are_an_error():
    from sd3_checkpoint import transformer_to_sd3

    with pytest.raises(KeyError, match="no SD3 name"):
        transformer_to_sd3({"transformer_blocks.0.attn.mystery.weight": torch.zeros(1)}, 1)
