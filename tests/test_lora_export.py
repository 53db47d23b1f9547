"""LoRAs for ComfyUI / A1111: the kohya-layout file beside the diffusers one, loaded back through
diffusers, gives the same UNet output; the learned identifier in the web UIs' embedding layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from prcore.data.schema import TrainConfig
from prcore.method.dco import train_subject_lora
from prcore.method.models import load_pipeline
from prcore.store.keys import LORA_KOHYA_FILE, LORA_WEBUI_EMBEDDING_FILE, LORA_WEIGHTS_FILE


def images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def unet_out(pipe, seed=0):
    from prcore.method.families import family_of

    family = family_of(pipe)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 8, 8), generator=g)
    cond = family.encode(pipe, ["a photo of a dog", "a dog in the snow"], "cpu")
    tids = family.time_ids(pipe, [(32, 32, 0, 0, 32, 32)] * 2, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        return family.predict(pipe, x, torch.tensor([500, 700]), cond, tids)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_kohya_file_loads_back_to_the_same_unet_output(kind, request, tmp_path):
    path = request.getfixturevalue(f"tiny_{kind}_path")
    trainer = load_pipeline(path, device="cpu", dtype="float32", cache=False)
    res = train_subject_lora(trainer, images=images(), class_noun="dog", identifier="sks", out_dir=tmp_path / "l",
                             config=TrainConfig(steps=4, rank=4, alpha=2.0, learning_rate=5e-2, resolution=32), progress=False)
    kohya = load_file(str(res.out_dir / LORA_KOHYA_FILE))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in kohya} == {"lora_down", "lora_up", "alpha"}
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}  # alpha != rank survives

    outs = {}
    for name in (LORA_WEIGHTS_FILE, LORA_KOHYA_FILE):
        pipe = load_pipeline(path, device="cpu", dtype="float32", cache=False)
        base = unet_out(pipe)
        pipe.load_lora_weights(str(res.out_dir), weight_name=name, adapter_name="x")
        outs[name] = unet_out(pipe)
    assert (outs[LORA_WEIGHTS_FILE] - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(outs[LORA_KOHYA_FILE], outs[LORA_WEIGHTS_FILE], atol=1e-5, rtol=1e-5)


def test_learned_identifier_in_webui_embedding_layout(tiny_sd, tmp_path):
    res = train_subject_lora(tiny_sd, images=images(seed=2), class_noun="dog", identifier="<zq>", out_dir=tmp_path / "l",
                             config=TrainConfig(steps=2, rank=2, resolution=32, train_text_embeddings=True), progress=False)
    webui = load_file(str(res.out_dir / LORA_WEBUI_EMBEDDING_FILE))
    diffusers = load_file(str(res.out_dir / "learned_embeds.safetensors"))
    assert list(webui) == ["emb_params"] and torch.equal(webui["emb_params"], diffusers["<zq>"])
    assert webui["emb_params"].shape == (1, tiny_sd.text_encoder.config.hidden_size)
