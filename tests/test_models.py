"""Loading what users have: the family read from the model's own files, the fp16 variant, and
dtype/device combinations that cannot work refused with one clear error."""

from __future__ import annotations

import shutil

import pytest
import torch

from prcore.method.families import StableDiffusion, StableDiffusionXL, family_of
from prcore.method.models import ModelNotFoundError, load_pipeline, resolve_dtype, weights_variant


def test_family_comes_from_the_files_not_the_name(tiny_sd_path, tiny_sdxl_path, tmp_path):
    xl_named_sd = shutil.copytree(tiny_sd_path, tmp_path / "my-xl-finetune")
    ssd_like = shutil.copytree(tiny_sdxl_path, tmp_path / "ssd-1b-distilled")
    assert isinstance(family_of(load_pipeline(xl_named_sd, device="cpu", cache=False)), StableDiffusion)
    assert isinstance(family_of(load_pipeline(ssd_like, device="cpu", cache=False)), StableDiffusionXL)


def test_unsupported_pipeline_class_is_one_clear_error(tiny_sd_path, tmp_path):
    import json

    other = shutil.copytree(tiny_sd_path, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    index.pop("text_encoder")
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match="FluxPipeline"):
        load_pipeline(other, device="cpu", cache=False)


@pytest.fixture(scope="module")
def fp16_only(tiny_sd_path, tmp_path_factory):
    """The tiny pipeline as a folder that ships only the fp16 variant (``*.fp16.safetensors``)."""
    pipe = load_pipeline(tiny_sd_path, device="cpu", dtype="float32", cache=False)
    folder = tmp_path_factory.mktemp("fp16") / "only-fp16"
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    assert not [p for p in folder.glob("*/*.safetensors") if ".fp16." not in p.name]
    return folder


def test_an_fp16_only_folder_loads_and_matches_the_fp16_weights(fp16_only, tiny_sd_path):
    pipe = load_pipeline(fp16_only, device="cpu", dtype="float32", cache=False)
    ref = load_pipeline(tiny_sd_path, device="cpu", dtype="float32", cache=False)
    w, w_ref = pipe.unet.conv_in.weight, ref.unet.conv_in.weight
    assert w.dtype == torch.float32 and torch.equal(w, w_ref.half().float())


def test_weights_variant_prefers_fp16_files_for_fp16(fp16_only, tiny_sd_path, tmp_path):
    both = shutil.copytree(tiny_sd_path, tmp_path / "both")
    for f in fp16_only.glob("*/*.fp16.safetensors"):
        shutil.copy(f, both / f.parent.name / f.name)
    assert weights_variant(both, torch.float16) == "fp16"  # half the bytes read, no cast
    assert weights_variant(both, torch.float32) is None and weights_variant(both, torch.bfloat16) is None
    assert weights_variant(fp16_only, torch.float32) == "fp16"  # nothing else to read
    assert weights_variant(tiny_sd_path, torch.float16) is None


def test_dtype_choice_and_fp16_off_cuda_is_refused(monkeypatch):
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype("bf16", "cpu") == torch.bfloat16
    for bf16_ok, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, ok=bf16_ok, **k: ok)
        assert resolve_dtype("auto", "cuda") == expected
    with pytest.raises(ValueError, match="float16 on cpu is not supported"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")
