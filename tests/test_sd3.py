"""SD3 / SD3.5 (MMDiT transformer, flow matching) through the same sampler, trainer and LoRA files
as SD, on a tiny SD3 pipeline (MMDiT-X dual attention, RMS q/k norm, 16 latent channels, T5)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_training import subject_images

from prcore.data.schema import TrainConfig, TrainingInputError
from prcore.method import adapters
from prcore.method.dco import TRAIN_ADAPTER_NAME, add_training_adapter, dco_loss, train_subject_lora
from prcore.method.families import family_named, family_of
from prcore.method.families.noise import FlowMatching
from prcore.method.lora_io import LoraMismatchError, injected_modules, load_subject_lora, unload_subject_lora
from prcore.method.models import load_pipeline
from prcore.method.sampler import SamplerError, sample
from prcore.store.keys import LORA_KOHYA_FILE, LORA_WEIGHTS_FILE

ADAPTER = "subj"
PROMPT = "a photo of {subject} in the snow"
SIZE = 32  # latents 8x8: 16 tokens of patch 2
ATOL = 1e-4


def random_lora(pipe, name: str = ADAPTER, seed: int = 123, targets=("to_q", "to_k", "to_v", "to_out.0")) -> None:
    """An output-changing LoRA on the transformer (peft initialises B to zero: randomise it)."""
    from peft import LoraConfig

    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(targets)), adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    for pname, param in transformer.named_parameters():
        if "lora_B" in pname and f".{name}." in pname:
            param.data = torch.randn(param.shape, generator=gen) * 0.3


@pytest.fixture(scope="module")
def sd3(tiny_sd3_path):
    pipe = load_pipeline(tiny_sd3_path, device="cpu", dtype="float32", cache=False)
    random_lora(pipe)
    return pipe


def run(pipe, **kw):
    args = dict(prompt=PROMPT, class_noun="dog", identifier="sks", adapter_name=ADAPTER, num_inference_steps=3,
                height=SIZE, width=SIZE, progress=False, output_type="latent", consistency_start=0.0, consistency_stop=1.0)
    args.update(kw)
    return sample(pipe, **args)


# ------------------------------------------------------------------------------------------------
# The family


def test_family_from_model_index_and_t5_is_optional(tiny_sd3_path, tmp_path):
    from prcore.method.tiny import build_tiny_pipeline

    pipe = load_pipeline(tiny_sd3_path, device="cpu", dtype="float32", cache=False)
    family = family_of(pipe)
    assert family is family_named("sd3") and family.denoiser(pipe) is pipe.transformer
    assert [type(e).__name__ for e in family.text_encoders(pipe)] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    cond = family.encode(pipe, ["a dog", "a cat"], "cpu")
    assert cond.embeds.shape == (2, 77 + 256, 64) and cond.pooled.shape == (2, 64)  # CLIP-L+G padded to T5's width; 77 + 256 tokens

    no_t5 = load_pipeline(build_tiny_pipeline(tmp_path / "no-t5", "sd3", with_t5=False), device="cpu", dtype="float32", cache=False)
    assert no_t5.text_encoder_3 is None and family_of(no_t5) is family
    cond = family.encode(no_t5, ["a dog"], "cpu")
    assert cond.embeds.shape == (1, 77 + 256, 64) and not cond.embeds[:, 77:].any()  # T5's tokens: zeros
    out = run(no_t5, guidance="pretrained", adapter_name=None, num_inference_steps=2, output_type="np")
    assert np.isfinite(out.images).all() and out.images.std() > 0.01


def test_flow_matching_noise_process_is_the_sd3_recipe(tiny_sd3):
    noise = family_of(tiny_sd3).noise_process(tiny_sd3)
    assert isinstance(noise, FlowMatching) and noise.shift == 3.0
    t = noise.draw_timesteps(20_000, torch.Generator().manual_seed(0))
    s = t / 1000
    assert 0 < s.min() and s.max() < 1
    u = torch.sigmoid(torch.randn(20_000, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(s, 3 * u / (1 + 2 * u))  # logit-normal, then the timestep shift 3
    assert abs(float(s.median()) - 0.75) < 0.01  # shift 3 moves the median sigma from 0.5 to 0.75
    x0, e = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    t2 = torch.tensor([250.0, 900.0])
    torch.testing.assert_close(noise.noisy(x0, e, t2)[1], 0.1 * x0[1] + 0.9 * e[1])
    torch.testing.assert_close(noise.target(x0, e, t2), e - x0)  # the velocity dx/ds
    with pytest.raises(TrainingInputError, match="snr_gamma"):
        noise.loss_weights(t2, 5.0)
    # DCO compares errors in epsilon units: a velocity error dv is an epsilon error (1 - s) dv
    v_hat = noise.target(x0, e, t2) + 0.1 * torch.randn(2, 16, 4, 4)
    e_hat = noise.noisy(x0, e, t2) + (1 - t2 / 1000).view(-1, 1, 1, 1) * v_hat
    eps_mse, v_mse = ((e_hat - e) ** 2).flatten(1).mean(1), ((v_hat - noise.target(x0, e, t2)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(eps_mse, noise.dco_error_scale(t2) * v_mse)
    torch.testing.assert_close(noise.dco_error_scale(t2), torch.tensor([0.75**2, 0.1**2]))


# ------------------------------------------------------------------------------------------------
# Sampling


def test_pretrained_mode_matches_diffusers_sd3_pipeline(tiny_sd3):
    """guidance='pretrained' is true CFG of the base model: the pixels of StableDiffusion3Pipeline.__call__."""
    ours = sample(tiny_sd3, prompt=PROMPT, class_noun="dog", identifier="sks", adapter_name=None, guidance="pretrained",
                  guidance_scale=5.0, num_inference_steps=4, height=SIZE, width=SIZE, seed=8, num_images=2, output_type="np", progress=False)
    theirs = tiny_sd3(ours.base_prompt, num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE, num_images_per_prompt=2,
                      generator=[torch.Generator().manual_seed(s) for s in ours.seeds], output_type="np").images
    assert ours.scheduler == "FlowMatchEulerDiscreteScheduler"
    assert np.abs(ours.images - ours.images.mean()).max() > 0.05
    np.testing.assert_allclose(ours.images, theirs, atol=1e-4)


def _reference_loop(pipe, *, personal, base, seed, steps, w_cfg, w_cg):
    """A plain consistency-guided flow-matching Euler loop: separate transformer calls, LoRA toggled."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tr = pipe.transformer
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    x = torch.randn((1, 16, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(seed))
    enc = {p: pipe.encode_prompt(p, None, None, device="cpu", do_classifier_free_guidance=False)[::2] for p in ("", base, personal)}

    def v(p, t):
        emb, pooled = enc[p]
        return tr(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=emb, pooled_projections=pooled).sample

    with torch.no_grad(), adapters.adapter_state_preserved(tr):
        adapters.use_adapter(tr, ADAPTER)
        for t in sched.timesteps:
            tr.disable_adapters()
            v_u, v_c = v("", t), v(base, t)
            tr.enable_adapters()
            v_p = v(personal, t)
            x = sched.step(v_u + w_cfg * (v_c - v_u) + w_cg * (v_p - v_c), t, x).prev_sample
    return x


def test_parallel_scale_one_is_consistency_guidance_on_velocities(sd3):
    out = run(sd3, parallel_scale=1.0, guidance_scale=5.0, consistency_scale=2.0, seed=11)
    ref = _reference_loop(sd3, personal=out.personal_prompt, base=out.base_prompt, seed=out.seeds[0], steps=3, w_cfg=5.0, w_cg=2.0)
    torch.testing.assert_close(out.images, ref, atol=ATOL, rtol=0)
    rescaled = run(sd3, parallel_scale=0.3, guidance_scale=5.0, consistency_scale=2.0, seed=11)
    assert (rescaled.images - out.images).abs().max() > 1e-3  # eta matters
    pretrained = run(sd3, guidance="pretrained", guidance_scale=5.0, seed=11)
    assert (pretrained.images - out.images).abs().max() > 1e-2  # the LoRA matters


def test_one_batched_forward_routes_the_lora_per_row_like_separate_calls(sd3):
    calls: list[int] = []
    hook = sd3.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        batched = run(sd3, num_images=2, seed=5)
        assert batched.batch_mode == "batched" and set(calls) == {6}  # [e_u, e_c, e_p] x 2 images in one forward
        calls.clear()
        separate = run(sd3, num_images=2, seed=5, batch_mode="separate")
        chunked = run(sd3, num_images=2, seed=5, max_batch_rows=4)
    finally:
        hook.remove()
    assert separate.batch_mode == "separate"
    torch.testing.assert_close(batched.images, separate.images, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked.images, batched.images, atol=ATOL, rtol=0)


def test_window_and_sizes_and_schedulers(sd3):
    assert run(sd3, num_inference_steps=4, consistency_stop=0.5).unet_rows == 3 * 2 + 2 * 2
    with pytest.raises(SamplerError, match="height=36 must be a positive multiple of the VAE factor x patch size 8"):
        run(sd3, height=36)
    with pytest.raises(SamplerError, match="scheduler 'ddim' cannot sample a flow-matching model; choose one of: euler"):
        run(sd3, scheduler="ddim")
    torch.testing.assert_close(run(sd3, scheduler="euler", seed=2).images, run(sd3, seed=2).images, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Training


def test_dco_loss_at_lora_init_is_exactly_log2(tiny_sd3_path):
    pipe = load_pipeline(tiny_sd3_path, device="cpu", dtype="float32", cache=False)
    family = family_of(pipe)
    noise = family.noise_process(pipe)
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    e = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = noise.draw_timesteps(2, torch.Generator().manual_seed(2))
    cond = family.encode(pipe, ["a photo of sks dog"] * 2, "cpu")
    add_training_adapter(pipe.transformer, TrainConfig(rank=4, alpha=8.0))
    pred = family.predict(pipe, noise.noisy(x0, e, t), t, cond, None)
    pipe.transformer.disable_adapters()
    with torch.no_grad():
        ref = family.predict(pipe, noise.noisy(x0, e, t), t, cond, None)
    assert torch.equal(pred.detach(), ref)
    assert dco_loss(pred, ref, noise.target(x0, e, t), 1000.0).item() == torch.tensor(math.log(2)).item()


def test_train_writes_transformer_lora_files_that_reload_whole(tiny_sd3_path, tiny_sd_path, tmp_path):
    trainer = load_pipeline(tiny_sd3_path, device="cpu", dtype="float32", cache=False)
    res = train_subject_lora(trainer, images=subject_images(3, size=(40, 48)), class_noun="dog", identifier="sks", out_dir=tmp_path / "l",
                             config=TrainConfig(steps=4, rank=4, alpha=2.0, learning_rate=5e-2, resolution=32), progress=False)
    rec = json.loads((res.out_dir / "training.json").read_text())
    assert rec["model_family"] == "sd3" and rec["gradient_checkpointing_used"] is True and len(rec["losses"]) == 4
    assert TRAIN_ADAPTER_NAME not in adapters.adapter_names_of(trainer.transformer)  # the pipeline is left as it was
    weights = load_file(str(res.out_dir / LORA_WEIGHTS_FILE))
    assert weights and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in weights)
    assert any(".attn2." in k for k in weights)  # MMDiT-X's second attention is adapted too (peft's suffix match)
    comfy = load_file(str(res.out_dir / LORA_KOHYA_FILE))
    assert comfy and all(k.startswith("lora_transformer_") for k in comfy)
    assert {float(v) for k, v in comfy.items() if k.endswith(".alpha")} == {2.0}

    pipe = load_pipeline(tiny_sd3_path, device="cpu", dtype="float32", cache=False)
    base = run(pipe, guidance="pretrained", adapter_name=None, seed=4).images
    load_subject_lora(pipe, res.out_dir, ADAPTER)
    assert injected_modules(pipe.transformer, ADAPTER) == {k.removeprefix("transformer.").split(".lora_")[0] for k in weights}
    out = run(pipe, seed=4, guidance="cfg").images
    assert (out - base).abs().max() > 1e-3
    unload_subject_lora(pipe, ADAPTER)
    torch.testing.assert_close(run(pipe, guidance="pretrained", adapter_name=None, seed=4).images, base, atol=0, rtol=0)
    sd = load_pipeline(tiny_sd_path, device="cpu", dtype="float32", cache=False)
    with pytest.raises(LoraMismatchError, match="did not apply to this StableDiffusionPipeline"):
        load_subject_lora(sd, res.out_dir, ADAPTER)


@pytest.mark.parametrize("config,message", [
    (TrainConfig(steps=1, snr_gamma=5.0, resolution=32), "snr_gamma"),
    (TrainConfig(steps=1, train_text_embeddings=True, resolution=32), "train_text_embeddings is not supported for SD 3 / 3.5"),
])
def test_refused_before_any_training(tiny_sd3, tmp_path, config, message):
    with pytest.raises(TrainingInputError, match=message):
        train_subject_lora(tiny_sd3, images=subject_images(2), class_noun="dog", identifier="sks", out_dir=tmp_path / "l",
                           config=config, progress=False)
    assert not (tmp_path / "l").exists()


def test_validate_refuses_what_an_sd3_model_cannot_do_before_any_work(tiny_sd3_path, tiny_sd_path, tmp_path):
    """`prcore manifest validate --model`: a scheduler the flow model cannot step, learned embeddings and
    min-SNR on SD3 rows are refused by row and column; the same cells on an SD row pass."""
    import polars as pl
    from typer.testing import CliRunner

    from prcore.cli import build_app

    img = tmp_path / "a.png"
    subject_images(1)[0].save(img)
    base = {"instance_images": [str(img)], "class_noun": "dog", "prompt": "a {subject}", "identifier": "sks"}
    rows = [{**base, "subject_id": "flow", "base_model": str(tiny_sd3_path), "scheduler": "ddim",
             "train_train_text_embeddings": True, "train_snr_gamma": 5.0},
            {**base, "subject_id": "unet", "base_model": str(tiny_sd_path), "scheduler": "ddim",
             "train_train_text_embeddings": True, "train_snr_gamma": 5.0}]
    pl.DataFrame(rows).write_parquet(tmp_path / "m.parquet")
    result = CliRunner().invoke(build_app("manifest"), ["manifest", "validate", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("row")]
    assert len(lines) == 3 and all("(subject flow)" in ln for ln in lines), result.output
    assert any("column scheduler: cannot sample base model" in ln and "SD 3 / 3.5" in ln and "choose one of: euler" in ln for ln in lines)
    assert any("column train_train_text_embeddings: is not supported" in ln for ln in lines)
    assert any("column train_snr_gamma: min-SNR weighting is for noise-predicting models" in ln for ln in lines)


def test_prcore_train_and_sample_commands_on_sd3(tiny_sd3_path, tmp_path):
    """The `prcore train` / `prcore sample` commands take an SD3 folder like an SD one; a diffusion
    scheduler on it is one line, exit 2, before any image is written."""
    from typer.testing import CliRunner

    from prcore.cli import build_app

    images = tmp_path / "refs"
    images.mkdir()
    for i, im in enumerate(subject_images(2)):
        im.save(images / f"{i}.png")
    common = ["--class-noun", "dog", "--identifier", "sks", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    train = CliRunner().invoke(build_app("train"), ["train", "--model", str(tiny_sd3_path), "--images", str(images), "--out",
                                                    str(tmp_path / "lora"), "--train-steps", "2", "--rank", "2", "--resolution", "32", *common])
    assert train.exit_code == 0, train.output
    assert json.loads((tmp_path / "lora" / "training.json").read_text())["model_family"] == "sd3"
    args = ["sample", "--model", str(tiny_sd3_path), "--lora", str(tmp_path / "lora"), "--prompt", "a {subject} on the beach",
            "--num-inference-steps", "2", "--height", "32", "--width", "32", "--num-images", "2", *common]
    done = CliRunner().invoke(build_app("sample"), [*args, "--out", str(tmp_path / "img")])
    assert done.exit_code == 0, done.output
    pngs = sorted((tmp_path / "img").glob("*.png"))
    sidecar = json.loads(pngs[0].with_suffix(".json").read_text())
    assert len(pngs) == 2 and sidecar["scheduler"] == "FlowMatchEulerDiscreteScheduler" and sidecar["unet_rows"] == 5
    refused = CliRunner().invoke(build_app("sample"), [*args, "--out", str(tmp_path / "none"), "--scheduler", "dpmpp_2m"])
    assert refused.exit_code == 2 and "cannot sample a flow-matching model" in refused.output
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
