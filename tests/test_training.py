"""DCO LoRA fine-tuning: loss, training on tiny SD/SDXL, LoRA save/load, fingerprints, bad inputs."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from prcore.data.images import ImageTooSmallError, NoImagesError, UnreadableImageError
from prcore.data.schema import TrainConfig, TrainingInputError
from prcore.method import dco as tr
from prcore.method.dco import LoraOverwriteError, dco_loss, lora_fingerprint, train_subject_lora
from prcore.method.families import family_of
from prcore.method.lora_io import load_subject_lora, save_lora, unload_subject_lora

RES = 32  # training resolution in the tests: 8x8 latents


def subject_images(n: int = 3, seed: int = 0, size=(48, 40)) -> list[Image.Image]:
    """A 'subject': a bright disc on a dark background, at slightly different places."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = size
        yy, xx = np.mgrid[:h, :w]
        cy, cx = h / 2 + rng.integers(-4, 5), w / 2 + rng.integers(-4, 5)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < (min(h, w) / 3) ** 2
        arr = np.where(disc[..., None], [230, 60, 40], [20, 30, 90]).astype(np.uint8)
        arr = np.clip(arr + rng.integers(-10, 10, arr.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr))
    return out


FAST = TrainConfig(steps=16, resolution=RES, learning_rate=3e-3, rank=4, alpha=2.0)


def fixed_batch(pipe, images, prompt: str, seed: int = 123):
    """Latents of the images (posterior mean), fixed noise and mid-range timesteps, conditioning."""
    from prcore.data.images import prepare_images

    prepared = prepare_images(images, RES)
    cache = tr.encode_latents(pipe, [p.image for p in prepared], flips=False)
    latents = (cache.mean[0] - cache.shift_factor) * cache.scaling_factor
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([200, 400, 600][: len(images)] + [500] * max(0, len(images) - 3))
    noisy = family_of(pipe).noise_process(pipe).noisy(latents, noise, t)
    with torch.no_grad():
        cond = family_of(pipe).encode(pipe, [prompt] * len(images), "cpu")
    time_ids = family_of(pipe).time_ids(pipe, tr._image_sizes(prepared, RES), dtype=torch.float32, device="cpu")
    return noisy, t, cond, time_ids, noise


def unet_out(pipe, batch) -> torch.Tensor:
    noisy, t, cond, time_ids, _ = batch
    with torch.no_grad():
        return family_of(pipe).predict(pipe, noisy, t, cond, time_ids)


# ------------------------------------------------------------------------------------------------
# The loss


def test_dco_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    model, ref, target = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    beta = 7.0
    mse_m = ((model - target) ** 2).mean(dim=(1, 2, 3))
    mse_r = ((ref - target) ** 2).mean(dim=(1, 2, 3))
    expected = (-torch.log(torch.sigmoid(-beta * (mse_m - mse_r)))).mean()
    torch.testing.assert_close(dco_loss(model, ref, target, beta), expected, rtol=1e-6, atol=1e-6)
    w = torch.tensor([0.5, 1.0, 2.0])
    expected_w = (-torch.log(torch.sigmoid(-beta * w * (mse_m - mse_r)))).mean()
    torch.testing.assert_close(dco_loss(model, ref, target, beta, w), expected_w, rtol=1e-6, atol=1e-6)
    # a model closer to the target than the reference is rewarded (loss < log 2), farther penalised
    assert dco_loss(target + 0.1 * ref, ref, target, beta) < math.log(2) < dco_loss(ref, target + 0.1 * ref, target, beta)


def test_dco_loss_gradient_only_through_model():
    g = torch.Generator().manual_seed(1)
    model = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    ref = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    dco_loss(model, ref, torch.zeros(2, 4, 4, 4), 1.0).backward()
    assert model.grad is not None and model.grad.abs().sum() > 0
    assert ref.grad is None


def test_dco_loss_equal_predictions_is_exactly_log2():
    x = torch.randn(2, 4, 8, 8)
    loss = dco_loss(x, x.clone(), torch.randn(2, 4, 8, 8), 1000.0)
    assert loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_dco_loss_at_lora_init_is_exactly_log2(kind, tiny_sd, tiny_sdxl):
    """A fresh LoRA (B = 0) predicts exactly what the adapter-disabled reference does."""
    pipe = tiny_sd if kind == "sd" else tiny_sdxl
    batch = fixed_batch(pipe, subject_images(2), "a photo of a dog")
    base = unet_out(pipe, batch)
    try:
        tr.add_training_adapter(pipe.unet, TrainConfig(rank=4, alpha=8.0))
        noisy, t, cond, time_ids, noise = batch
        model_pred = family_of(pipe).predict(pipe, noisy, t, cond, time_ids)
        pipe.unet.disable_adapters()
        with torch.no_grad():
            ref_pred = family_of(pipe).predict(pipe, noisy, t, cond, time_ids)
        pipe.unet.enable_adapters()
        assert torch.equal(model_pred.detach(), ref_pred)
        assert torch.equal(ref_pred, base)
        loss = dco_loss(model_pred, ref_pred, noise, 1000.0)
        assert loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()
        loss.backward()
        grads = [p.grad for n, p in pipe.unet.named_parameters() if "lora_B" in n]
        assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    finally:
        tr._remove_training_adapter(pipe)
    assert torch.equal(unet_out(pipe, batch), base)


# ------------------------------------------------------------------------------------------------
# Training runs (one per kind, shared by several tests)


@pytest.fixture(scope="module")
def trained(tiny_sd, tiny_sdxl, tmp_path_factory):
    """Train once per pipeline kind; record the base UNet output on a fixed batch before training."""
    out = {}
    images = subject_images(3)
    for kind, pipe in (("sd", tiny_sd), ("sdxl", tiny_sdxl)):
        batch = fixed_batch(pipe, images, "a photo of a sks dog")
        base_before = unet_out(pipe, batch)
        ref = unet_out(pipe, fixed_batch(pipe, images, "a photo of a dog"))  # DCO reference: base caption
        lora_dir = tmp_path_factory.mktemp(f"lora-{kind}") / "subject"
        result = train_subject_lora(pipe, images=images, class_noun="dog", identifier="sks", out_dir=lora_dir,
                                    config=FAST, progress=False)
        out[kind] = dict(pipe=pipe, batch=batch, base=base_before, ref=ref, result=result, images=images)
    return out


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_training_lowers_fixed_batch_loss_and_leaves_pipeline_unchanged(kind, trained):
    t = trained[kind]
    pipe, batch, result = t["pipe"], t["batch"], t["result"]
    noise = batch[4]
    # the cached pipeline is exactly as before training (adapter removed)
    assert torch.equal(unet_out(pipe, batch), t["base"])
    assert not getattr(pipe.unet, "peft_config", {})
    load_subject_lora(pipe, result.out_dir, "subj")
    try:
        tuned = unet_out(pipe, batch)
    finally:
        unload_subject_lora(pipe, "subj")
    # fixed images, noise and timesteps (200/400/600): the DCO objective and the denoising error both fall
    dco_before = dco_loss(t["base"], t["ref"], noise, FAST.dco_beta).item()
    dco_after = dco_loss(tuned, t["ref"], noise, FAST.dco_beta).item()
    assert dco_after < 0.75 * dco_before, (dco_before, dco_after)
    base_mse = tr.per_sample_mse(t["base"], noise).mean().item()
    tuned_mse = tr.per_sample_mse(tuned, noise).mean().item()
    assert tuned_mse < base_mse, (base_mse, tuned_mse)
    assert torch.equal(unet_out(pipe, batch), t["base"])
    assert len(result.losses) == FAST.steps and all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_folder_layout_and_training_json(kind, trained):
    result = trained[kind]["result"]
    files = sorted(p.name for p in Path(result.out_dir).iterdir())
    assert files == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors", "training.json"]
    assert not any(p.name.startswith(".") for p in Path(result.out_dir).parent.iterdir())  # no temp folder left
    rec = json.loads((result.out_dir / "training.json").read_text())
    assert rec["fingerprint"] == result.fingerprint
    assert rec["losses"] == result.losses
    assert rec["config"] == FAST.to_dict()
    assert rec["model_family"] == kind and rec["base_model_id"] == trained[kind]["pipe"]._prcore_model_id
    assert rec["personal_captions"] == ["a photo of a sks dog"] * 3 and rec["base_captions"] == ["a photo of a dog"] * 3
    assert rec["seconds_per_step"] > 0 and rec["cpu_seconds_per_step"] > 0 and rec["peak_memory_bytes"] > 0
    assert {"torch", "diffusers", "peft", "transformers"} <= set(rec["library_versions"])
    state = load_file(str(result.out_dir / "pytorch_lora_weights.safetensors"))
    assert state and all(k.startswith("unet.") for k in state)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_same_subject_is_not_trained_twice_and_other_subject_is_refused(kind, trained):
    t = trained[kind]
    result = t["result"]
    before = {p.name: p.read_bytes() for p in result.out_dir.iterdir()}
    again = train_subject_lora(t["pipe"], images=t["images"], class_noun="dog", identifier="sks",
                               out_dir=result.out_dir, config=FAST, progress=False)
    assert again.reused and again.fingerprint == result.fingerprint and again.losses == result.losses
    with pytest.raises(LoraOverwriteError, match="different subject's LoRA"):
        train_subject_lora(t["pipe"], images=t["images"], class_noun="cat", identifier="sks",
                           out_dir=result.out_dir, config=FAST, progress=False)
    assert {p.name: p.read_bytes() for p in result.out_dir.iterdir()} == before


def test_training_is_deterministic_on_cpu(tiny_sd, tmp_path):
    images = subject_images(2, seed=5)
    cfg = TrainConfig(steps=3, resolution=RES, rank=2, alpha=4.0, learning_rate=1e-3)
    runs = [train_subject_lora(tiny_sd, images=images, class_noun="dog", identifier="sks", out_dir=tmp_path / f"r{i}",
                               config=cfg, progress=False) for i in range(2)]
    assert runs[0].fingerprint == runs[1].fingerprint
    assert runs[0].losses == runs[1].losses
    a, b = (load_file(str(r.out_dir / "pytorch_lora_weights.safetensors")) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Save / load round trip


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_saved_lora_reloads_to_same_unet_output(kind, tiny_sd, tiny_sdxl, tmp_path):
    """The file loaded by diffusers' own load_lora_weights reproduces the in-memory adapter.

    Tolerance: 1e-6 absolute (float32; the reloaded layers compute the same products, possibly in
    another order). alpha != rank checks that the saved config metadata restores the scaling.
    """
    pipe = tiny_sd if kind == "sd" else tiny_sdxl
    batch = fixed_batch(pipe, subject_images(2), "a photo of a sks dog")
    base = unet_out(pipe, batch)
    cfg = TrainConfig(rank=4, alpha=3.0)
    try:
        tr.add_training_adapter(pipe.unet, cfg)
        g = torch.Generator().manual_seed(3)
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.data = 0.2 * torch.randn(p.shape, generator=g)
        in_memory = unet_out(pipe, batch)
        save_lora(pipe, tmp_path, tr.TRAIN_ADAPTER_NAME)
    finally:
        tr._remove_training_adapter(pipe)
    assert not torch.allclose(in_memory, base, atol=1e-3)
    pipe.load_lora_weights(str(tmp_path), adapter_name="reloaded")
    try:
        assert pipe.unet.peft_config["reloaded"].lora_alpha == 3.0
        reloaded = unet_out(pipe, batch)
        torch.testing.assert_close(reloaded, in_memory, rtol=0, atol=1e-6)
        pipe.unet.disable_adapters()
        assert torch.equal(unet_out(pipe, batch), base)  # LoRA disabled: exactly the base model
        pipe.unet.enable_adapters()
    finally:
        pipe.delete_adapters("reloaded")
    assert torch.equal(unet_out(pipe, batch), base)


def test_load_subject_lora_is_idempotent(trained):
    t = trained["sd"]
    pipe = t["pipe"]
    load_subject_lora(pipe, t["result"].out_dir, "twice")
    try:
        first = unet_out(pipe, t["batch"])
        load_subject_lora(pipe, t["result"].out_dir, "twice")
        assert list(pipe.unet.peft_config) == ["twice"]
        assert torch.equal(unet_out(pipe, t["batch"]), first)
    finally:
        unload_subject_lora(pipe, "twice")
    unload_subject_lora(pipe, "twice")  # unloading twice is harmless
    assert torch.equal(unet_out(pipe, t["batch"]), t["base"])


def test_load_subject_lora_missing_folder(tiny_sd, tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        load_subject_lora(tiny_sd, tmp_path / "nope", "x")


# ------------------------------------------------------------------------------------------------
# Options: v-prediction, min-SNR, offset noise, prior preservation, checkpointing, token embeddings


@pytest.fixture(scope="module")
def vpred_sd(tiny_sd_path):
    from diffusers import DDIMScheduler

    from prcore.method.models import load_pipeline

    pipe = load_pipeline(tiny_sd_path, device="cpu", dtype="float32", cache=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe


def test_all_options_train_on_v_prediction_with_token_embedding(vpred_sd, tmp_path):
    pipe = vpred_sd
    images = subject_images(2, seed=9)
    batch = fixed_batch(pipe, images, "a photo of a dog")
    base = unet_out(pipe, batch)
    vocab = len(pipe.tokenizer)
    cfg = TrainConfig(steps=2, resolution=RES, rank=2, alpha=2.0, snr_gamma=5.0, offset_noise=0.1,
                      prior_preservation=True, num_class_images=2, gradient_checkpointing=True,
                      train_text_embeddings=True, batch_size=2)
    res = train_subject_lora(pipe, images=images, class_noun="dog", identifier="<zq>", out_dir=tmp_path / "l",
                             captions=["a photo of a {subject}", "a {subject} in the snow"], config=cfg, progress=False)
    assert len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    # pipeline restored: tokenizer, embeddings, checkpointing, output
    assert len(pipe.tokenizer) == vocab and pipe.text_encoder.get_input_embeddings().weight.shape[0] == vocab
    assert not pipe.unet.is_gradient_checkpointing
    assert torch.equal(unet_out(pipe, batch), base)
    emb = load_file(str(res.out_dir / "learned_embeds.safetensors"))
    assert list(emb) == ["<zq>"] and emb["<zq>"].shape == (1, pipe.text_encoder.config.hidden_size)
    rec = json.loads((res.out_dir / "training.json").read_text())
    assert rec["personal_captions"] == ["a photo of a <zq> dog", "a <zq> dog in the snow"]
    load_subject_lora(pipe, res.out_dir, "zq")
    try:
        ids = pipe.tokenizer("a <zq> dog").input_ids
        assert pipe.tokenizer.convert_tokens_to_ids("<zq>") in ids
        torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[-1], emb["<zq>"][0])
        from prcore.method.sampler import sample

        out = sample(pipe, prompt="a {subject} on a hat", class_noun="dog", identifier="<zq>", adapter_name="zq",
                     num_inference_steps=2, height=RES, width=RES, output_type="np", progress=False)
        assert out.personal_prompt == "a <zq> dog on a hat" and np.isfinite(np.asarray(out.images)).all()
    finally:
        unload_subject_lora(pipe, "zq")
    assert len(pipe.tokenizer) == vocab
    assert torch.equal(unet_out(pipe, batch), base)


def test_v_prediction_target_is_velocity(vpred_sd):
    noise = family_of(vpred_sd).noise_process(vpred_sd)
    sched = noise.train_scheduler
    assert sched.config.prediction_type == "v_prediction"
    w = noise.loss_weights(torch.tensor([10, 500, 990]), 5.0)
    snr = sched.alphas_cumprod[[10, 500, 990]] / (1 - sched.alphas_cumprod[[10, 500, 990]])
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / (snr + 1))


# ------------------------------------------------------------------------------------------------
# Fingerprints


def _fp(**over):
    args = dict(base_model_id="m", images=[b"img1", b"img2"], class_noun="dog", identifier="sks", captions=None,
                config=TrainConfig())
    args.update(over)
    return lora_fingerprint(**args)


CHANGED_CONFIG = {
    "steps": 401, "learning_rate": 2e-4, "rank": 4, "alpha": 4.0, "target_modules": ("to_q", "to_v"),
    "resolution": 512, "batch_size": 2, "dco_beta": 0.0, "seed": 1, "mixed_precision": "bf16",
    "train_text_embeddings": True, "prior_preservation": True, "optimizer": "adamw8bit",
    "num_class_images": 10, "prior_loss_weight": 0.5, "offset_noise": 0.05, "snr_gamma": 5.0, "random_flip": False,
}
MEMORY_ONLY = {"gradient_checkpointing": True}  # changes memory, not the weights: same fingerprint


def test_changed_config_covers_every_field():
    assert set(CHANGED_CONFIG) | set(MEMORY_ONLY) == set(TrainConfig.field_names())


@pytest.mark.parametrize("field", sorted(MEMORY_ONLY))
def test_memory_knobs_keep_the_fingerprint(field):
    assert _fp(config=dataclasses.replace(TrainConfig(), **{field: MEMORY_ONLY[field]})) == _fp()


def test_fingerprint_stable_and_default_captions_equivalent():
    assert _fp() == _fp() and len(_fp()) == 16
    assert _fp(captions=["a photo of a {subject}"] * 2) == _fp()
    assert _fp(config=TrainConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"])) == _fp()


@pytest.mark.parametrize("field", sorted(CHANGED_CONFIG))
def test_fingerprint_changes_with_each_config_field(field):
    assert _fp(config=dataclasses.replace(TrainConfig(), **{field: CHANGED_CONFIG[field]})) != _fp()


@pytest.mark.parametrize("change", [
    {"base_model_id": "m2"}, {"images": [b"img1", b"img3"]}, {"images": [b"img2", b"img1"]}, {"images": [b"img1"]},
    {"class_noun": "cat"}, {"identifier": "zwx"}, {"captions": ["a {subject}", "a photo of a {subject}"]},
])
def test_fingerprint_changes_with_each_input(change):
    assert _fp(**change) != _fp()


def test_fingerprint_changes_with_algorithm_version(monkeypatch):
    before = _fp()
    monkeypatch.setattr(tr, "TRAINING_ALGORITHM_VERSION", tr.TRAINING_ALGORITHM_VERSION + 1)
    assert _fp() != before


def test_file_bytes_and_train_fingerprint_agree(trained):
    """A caller holding the image files' bytes computes the fingerprint train_subject_lora records."""
    t = trained["sd"]
    data = []
    for im in t["images"]:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data.append(buf.getvalue())
    fp = lora_fingerprint(base_model_id=t["pipe"]._prcore_model_id, images=data, class_noun="dog", identifier="sks",
                          captions=None, config=FAST)
    assert fp != t["result"].fingerprint  # PIL images are identified by pixels, files by bytes...
    res = train_subject_lora(t["pipe"], images=data, class_noun="dog", identifier="sks",
                             out_dir=t["result"].out_dir.parent / "from-bytes", config=dataclasses.replace(FAST, steps=1),
                             progress=False)
    assert res.fingerprint == lora_fingerprint(base_model_id=t["pipe"]._prcore_model_id, images=data, class_noun="dog",
                                               identifier="sks", captions=None, config=dataclasses.replace(FAST, steps=1))


# ------------------------------------------------------------------------------------------------
# Bad inputs: one clear error each, nothing written


def _train(pipe, out, **over):
    args = dict(images=subject_images(1), class_noun="dog", identifier="sks", out_dir=out,
                config=TrainConfig(steps=1, resolution=RES), progress=False)
    args.update(over)
    return train_subject_lora(pipe, **args)


def test_error_no_images(tiny_sd, tmp_path):
    with pytest.raises(NoImagesError, match="no instance images"):
        _train(tiny_sd, tmp_path / "o", images=[])
    assert not (tmp_path / "o").exists()


def test_error_unreadable_and_truncated_images(tiny_sd, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(UnreadableImageError, match="notes.png"):
        _train(tiny_sd, tmp_path / "o", images=[bad])
    buf = io.BytesIO()
    subject_images(1)[0].save(buf, format="PNG")
    trunc = tmp_path / "cut.png"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UnreadableImageError, match=r"cut\.png.*truncated"):
        _train(tiny_sd, tmp_path / "o", images=[subject_images(1)[0], trunc])
    assert not (tmp_path / "o").exists()


def test_error_image_too_small(tiny_sd, tmp_path):
    small = Image.new("RGB", (40, 12), "red")
    with pytest.raises(ImageTooSmallError, match=r"40x12 pixels.*at least 16 pixels.*resolution 32"):
        _train(tiny_sd, tmp_path / "o", images=[small])


@pytest.mark.parametrize("ident,noun", [("dog", "dog"), ("Dog", "dog"), ("retriever", "golden retriever"), ("", "dog"),
                                        ("two words", "dog")])
def test_error_identifier_collides_or_invalid(tiny_sd, tmp_path, ident, noun):
    with pytest.raises(TrainingInputError, match="identifier"):
        _train(tiny_sd, tmp_path / "o", identifier=ident, class_noun=noun)


@pytest.mark.parametrize("field,value", [("steps", 0), ("steps", -3), ("rank", 0), ("rank", -1),
                                         ("learning_rate", 0.0), ("mixed_precision", "fp8"), ("batch_size", 0)])
def test_error_bad_config(field, value):
    with pytest.raises(TrainingInputError, match=f"{field} must be"):
        TrainConfig(**{field: value})


def test_error_captions(tiny_sd, tmp_path):
    with pytest.raises(TrainingInputError, match="placeholder"):
        _train(tiny_sd, tmp_path / "o", captions=["a photo of a dog"])
    with pytest.raises(TrainingInputError, match="2 captions for 1 images"):
        _train(tiny_sd, tmp_path / "o", captions=["a {subject}", "b {subject}"])


def test_error_refuses_non_lora_folder(tiny_sd, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(LoraOverwriteError, match="refusing to overwrite"):
        _train(tiny_sd, out)
    assert (out / "precious.txt").read_text() == "keep me"


def test_error_text_embedding_identifier_already_a_word(tiny_sd, tmp_path):
    with pytest.raises(TrainingInputError, match="already in the tokenizer vocabulary"):
        _train(tiny_sd, tmp_path / "o", config=TrainConfig(steps=1, resolution=RES, train_text_embeddings=True))


# ------------------------------------------------------------------------------------------------
# Training feeds the sampler


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_trained_lora_feeds_the_sampler(kind, trained):
    from prcore.method.sampler import sample

    t = trained[kind]
    pipe = t["pipe"]
    args = dict(prompt="a {subject} in the snow", class_noun="dog", identifier="sks", num_inference_steps=3,
                height=RES, width=RES, seed=7, num_images=2, output_type="np", progress=False)
    load_subject_lora(pipe, t["result"].out_dir, f"subject-{kind}")
    try:
        out = sample(pipe, adapter_name=f"subject-{kind}", guidance="parallel_rescaled", **args)
        plain = sample(pipe, adapter_name=f"subject-{kind}", guidance="parallel_rescaled",
                       **{**args, "seed": [s for s in out.seeds]})
        pretrained = sample(pipe, adapter_name=None, guidance="pretrained", **args)
    finally:
        unload_subject_lora(pipe, f"subject-{kind}")
    images = np.asarray(out.images)
    assert images.shape == (2, RES, RES, 3) and np.isfinite(images).all()
    assert out.personal_prompt == "a sks dog in the snow" and out.base_prompt == "a dog in the snow"
    np.testing.assert_array_equal(np.asarray(plain.images), images)  # same seeds, same pixels
    assert np.abs(images - np.asarray(pretrained.images)).max() > 1e-4  # the LoRA steers the samples
    assert torch.equal(unet_out(pipe, t["batch"]), t["base"])


def test_config_numbers_are_canonical():
    """Manifest values (numpy ints, integral floats) fingerprint like the Python defaults."""
    cfg = TrainConfig(steps=np.int64(400), alpha=8, rank=8.0, learning_rate=np.float32(1e-4).item(),
                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    assert cfg == TrainConfig(learning_rate=cfg.learning_rate)
    assert isinstance(cfg.steps, int) and isinstance(cfg.alpha, float) and isinstance(cfg.rank, int)
    assert _fp(config=TrainConfig(alpha=8)) == _fp()
    with pytest.raises(TrainingInputError, match="steps must be an integer"):
        TrainConfig(steps=2.5)


def test_training_with_another_subject_loaded_keeps_it(trained, tmp_path):
    """A worker may hold subject A's adapter while training subject B: A stays loaded and active."""
    t = trained["sd"]
    pipe = t["pipe"]
    load_subject_lora(pipe, t["result"].out_dir, "other")
    try:
        with_other = unet_out(pipe, t["batch"])
        res = train_subject_lora(pipe, images=subject_images(2, seed=3), class_noun="cat", identifier="zwx",
                                 out_dir=tmp_path / "b", config=TrainConfig(steps=2, resolution=RES, rank=2), progress=False)
        assert list(pipe.unet.peft_config) == ["other"]
        assert torch.equal(unet_out(pipe, t["batch"]), with_other)
        state = load_file(str(res.out_dir / "pytorch_lora_weights.safetensors"))
        assert all(v.shape[0] == 2 or v.shape[1] == 2 for v in state.values())  # rank 2: B's adapter, not A's
    finally:
        unload_subject_lora(pipe, "other")
    assert torch.equal(unet_out(pipe, t["batch"]), t["base"])


# ------------------------------------------------------------------------------------------------
# Input hygiene


def test_exif_orientation_rgba_and_center_crop():
    from prcore.data.images import decode_image, prepare_images

    img = Image.new("RGB", (60, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 30, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = decode_image(buf.getvalue())
    assert upright.size == (40, 60)  # orientation applied
    assert upright.getpixel((20, 5))[2] > 200 and upright.getpixel((20, 55))[0] > 200  # blue on top after rotation
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert decode_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white
    prepared = prepare_images([buf.getvalue()], RES)[0]
    assert prepared.image.size == (RES, RES) and prepared.image.mode == "RGB"
    assert prepared.original_size == (60, 40) and prepared.crop_top_left == (8, 0)  # 32x48 resized, center row crop
