"""The personalized sampler on real tiny SD / SDXL pipelines with a real diffusers-format LoRA.

Tolerances: "batched == separate" and "sampler == reference loop" compare final latents with
atol 1e-4 (float32 on CPU; a batched GEMM may round differently from a smaller one), which is
four orders of magnitude below the LoRA's own effect on the latents (asserted > 0.05).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prcore.method import adapters
from prcore.method.families.noise import SCHEDULER_NAMES
from prcore.method.models import load_pipeline
from prcore.method.sampler import SamplerError, image_seeds, render_prompts, sample

ADAPTER = "subj"
ATOL = 1e-4
PROMPT = "a photo of {subject} in the snow"
SIZE = 32


def save_random_lora(path, lora_dir, seed: int = 123) -> None:
    """Write a random, output-changing UNet LoRA for the pipeline at ``path`` in diffusers format; the
    same ``seed``, the same LoRA, whatever ran before."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = load_pipeline(path, device="cpu", dtype="float32", cache=False)
    with torch.random.fork_rng(devices=[]):  # lora_A's gaussian init draws from the global RNG
        torch.manual_seed(seed)
        donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                               adapter_name=ADAPTER)
    gen = torch.Generator().manual_seed(seed)
    for name, param in donor.unet.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero: randomise so the LoRA changes outputs
            param.data = torch.randn(param.shape, generator=gen) * 0.5
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(donor.unet, adapter_name=ADAPTER))
    type(donor).save_lora_weights(lora_dir, unet_lora_layers=state, safe_serialization=True)


def _lora_pipe(path, kind: str, lora_dir):
    """A private (uncached) pipeline with that LoRA loaded through diffusers' load_lora_weights."""
    save_random_lora(path, lora_dir)
    pipe = load_pipeline(path, device="cpu", dtype="float32", cache=False)
    pipe.load_lora_weights(str(lora_dir), adapter_name=ADAPTER, use_safetensors=True)
    return pipe


@pytest.fixture(scope="module")
def sd(tiny_sd_path, tmp_path_factory):
    return _lora_pipe(tiny_sd_path, "sd", tmp_path_factory.mktemp("lora-sd"))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path, tmp_path_factory):
    return _lora_pipe(tiny_sdxl_path, "sdxl", tmp_path_factory.mktemp("lora-sdxl"))


def run(pipe, **kw):
    args = dict(prompt=PROMPT, class_noun="dog", identifier="sks", adapter_name=ADAPTER, num_inference_steps=2,
                height=SIZE, width=SIZE, progress=False, output_type="latent",
                consistency_start=0.0, consistency_stop=1.0)  # the method on the whole trajectory (the window: its own test)
    args.update(kw)
    return sample(pipe, **args)


def test_render_prompts():
    assert render_prompts("a {subject} on the beach", "dog", "sks") == ("a sks dog on the beach", "a dog on the beach")
    with pytest.raises(SamplerError, match=r"no \{subject\}"):
        render_prompts("a dog on the beach", "dog", "sks")
    with pytest.raises(SamplerError, match="unknown placeholder"):
        render_prompts("a {subject} at {place}", "dog", "sks")


def test_image_seeds_stable_and_independent_of_count():
    assert image_seeds(5, 3) == image_seeds(5, 3)
    assert image_seeds(5, 3)[:2] == image_seeds(5, 2)
    assert len(set(image_seeds(5, 3) + image_seeds(6, 3))) == 6
    assert image_seeds([4, 9], 2) == [4, 9]
    with pytest.raises(SamplerError, match="one seed per image"):
        image_seeds([1, 2], 3)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_changes_the_unet_output(kind, request):
    """The fixture LoRA really matters, and per-sample routing gives each row its own adapter."""
    pipe = request.getfixturevalue(kind)
    unet = pipe.unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=torch.float32)}

    def fwd():
        return unet(x, 10, encoder_hidden_states=emb, added_cond_kwargs=added).sample

    with torch.no_grad(), adapters.adapter_state_preserved(unet):
        adapters.use_adapter(unet, adapters.BASE)
        base = fwd()
        adapters.use_adapter(unet, ADAPTER)
        lora = fwd()
        with adapters.per_sample_adapters(unet, [adapters.BASE, ADAPTER]):
            mixed = fwd()
    assert (lora - base).abs().max() > 0.05
    torch.testing.assert_close(mixed[0], base[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], lora[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("guidance", ["parallel_rescaled", "consistency", "cfg", "pretrained"])
def test_every_guidance_mode_end_to_end(kind, guidance, request):
    pipe = request.getfixturevalue(kind)
    out = run(pipe, guidance=guidance, num_images=2, output_type="pil", seed=3, adapter_name=None if guidance == "pretrained" else ADAPTER)
    assert len(out.images) == 2 and out.seeds == image_seeds(3, 2)
    for img in out.images:
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        arr = np.asarray(img, dtype=np.float32)
        assert arr.std() > 1.0  # an image, not a flat fill
    assert out.personal_prompt == "a photo of sks dog in the snow" and out.base_prompt == "a photo of dog in the snow"
    assert out.batch_mode == ("batched" if guidance in ("parallel_rescaled", "consistency") else "single")
    assert out.seconds > 0


def test_guidance_modes_differ_and_lora_matters(sd):
    lat = {g: run(sd, guidance=g).images for g in ("parallel_rescaled", "consistency", "cfg", "pretrained")}
    for a in lat:
        for b in lat:
            if a < b:
                assert (lat[a] - lat[b]).abs().max() > 0.05, (a, b)
    # consistency_scale=0 leaves only CFG of the pretrained model on the base prompt
    torch.testing.assert_close(run(sd, consistency_scale=0.0).images, lat["pretrained"], atol=ATOL, rtol=0)


def _reference_dco(pipe, *, personal, base, seed, steps, w_cfg, w_cg):
    """Straightforward DCO consistency-guided DDIM loop: separate UNet calls, LoRA toggled on the UNet."""
    from diffusers import DDIMScheduler

    unet = pipe.unet
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    latents = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
    e_neg, e_base, e_pers = (pipe.encode_prompt(p, "cpu", 1, False)[0] for p in ("", base, personal))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            unet.disable_adapters()
            e_u = unet(x, t, encoder_hidden_states=e_neg).sample
            e_c = unet(x, t, encoder_hidden_states=e_base).sample
            unet.enable_adapters()
            e_p = unet(x, t, encoder_hidden_states=e_pers).sample
            eps = e_u + w_cfg * (e_c - e_u) + w_cg * (e_p - e_c)
            latents = sched.step(eps, t, latents).prev_sample
    return latents


def test_parallel_scale_one_reproduces_reference_dco_loop(sd):
    out = run(sd, guidance="parallel_rescaled", parallel_scale=1.0, guidance_scale=5.0, consistency_scale=2.0, num_inference_steps=3, seed=11)
    ref = _reference_dco(sd, personal=out.personal_prompt, base=out.base_prompt, seed=out.seeds[0], steps=3, w_cfg=5.0, w_cg=2.0)
    assert (out.images - run(sd, guidance="pretrained", guidance_scale=5.0, num_inference_steps=3, seed=11).images).abs().max() > 0.05
    torch.testing.assert_close(out.images, ref, atol=ATOL, rtol=0)
    dco = run(sd, guidance="consistency", guidance_scale=5.0, consistency_scale=2.0, num_inference_steps=3, seed=11)
    torch.testing.assert_close(out.images, dco.images, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_batched_equals_separate(kind, request):
    pipe = request.getfixturevalue(kind)
    batched = run(pipe, num_images=2, seed=5)
    separate = run(pipe, num_images=2, seed=5, batch_mode="separate")
    assert (batched.batch_mode, separate.batch_mode) == ("batched", "separate")
    torch.testing.assert_close(batched.images, separate.images, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("batch_mode", ["auto", "separate"])
def test_max_batch_rows_chunks_the_unet_rows_with_the_same_result(kind, batch_mode, request):
    """3 row groups x 3 images = 9 rows a step; chunks of 2 and 4 rows (a chunk straddles a group
    boundary, so per-sample routing must follow the rows) draw what one 9-row forward draws."""
    pipe = request.getfixturevalue(kind)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        whole = run(pipe, num_images=3, seed=8, batch_mode=batch_mode)
        rows_whole, calls[:] = list(calls), []
        for cap in (2, 4):
            chunked = run(pipe, num_images=3, seed=8, batch_mode=batch_mode, max_batch_rows=cap)
            assert max(calls) <= cap and sum(calls) == sum(rows_whole)
            calls.clear()
            torch.testing.assert_close(chunked.images, whole.images, atol=ATOL, rtol=0)
    finally:
        hook.remove()
    assert max(rows_whole) == (9 if batch_mode == "auto" else 6)  # separate: base rows together, LoRA rows apart
    with pytest.raises(SamplerError, match="max_batch_rows"):
        run(pipe, max_batch_rows=0)


def test_vae_decodes_one_image_per_call_and_tiling_restores_the_vae(sd):
    calls = []
    hook = sd.vae.register_forward_pre_hook(lambda *a: None)
    original = sd.vae.decode

    def counting(z, *a, **k):
        calls.append(z.shape[0])
        return original(z, *a, **k)

    sd.vae.decode = counting
    try:
        plain = run(sd, num_images=3, seed=3, output_type="np")
        tiled = run(sd, num_images=3, seed=3, output_type="np", vae_tiling=True)
    finally:
        del sd.vae.decode
        hook.remove()
    assert calls == [1] * 6 and not sd.vae.use_tiling
    np.testing.assert_allclose(tiled.images, plain.images, atol=1e-6)  # images smaller than a tile: no seams
    assert plain.peak_memory_bytes > 0


def test_fused_lora_falls_back_to_separate_calls_and_stays_fused(sd):
    reference = run(sd, seed=2)
    sd.fuse_lora(adapter_names=[ADAPTER])
    try:
        fused = run(sd, seed=2)
        assert fused.batch_mode == "separate"
        assert all(layer.merged for layer in adapters.lora_layers(sd.unet))
        with pytest.raises(SamplerError, match="merged/fused"):
            run(sd, seed=2, batch_mode="batched")
    finally:
        sd.unfuse_lora()
    torch.testing.assert_close(fused.images, reference.images, atol=ATOL, rtol=0)


def test_dora_blocks_per_sample_routing():
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], use_dora=True), model, adapter_name="d")
    assert "DoRA" in adapters.mixed_batch_blocker(model, [adapters.BASE, "d"])
    assert adapters.mixed_batch_blocker(model, [adapters.BASE]) is None


def test_adapter_state_and_scales_untouched(sd):
    layers = adapters.lora_layers(sd.unet)
    before = [(tuple(layer.active_adapters), layer.disable_adapters, dict(layer.scaling)) for layer in layers]
    sd.unet.disable_adapters()
    run(sd)
    assert all(layer.disable_adapters for layer in layers)
    sd.unet.enable_adapters()
    run(sd, guidance="cfg")
    assert [(tuple(layer.active_adapters), layer.disable_adapters, dict(layer.scaling)) for layer in layers] == before
    assert type(sd.scheduler).__name__ == "DDIMScheduler"


def test_determinism(sd):
    a = run(sd, num_images=2, seed=9, output_type="np")
    b = run(sd, num_images=2, seed=9, output_type="np")
    np.testing.assert_array_equal(a.images, b.images)
    other = run(sd, num_images=2, seed=10, output_type="np")
    assert np.abs(a.images - other.images).max() > 0.05
    assert np.abs(a.images[0] - a.images[1]).max() > 0.05  # images of one request differ
    # image i depends on its own seed only, not on how many images the request has
    one = run(sd, num_images=1, seed=9, output_type="np")
    np.testing.assert_allclose(one.images[0], a.images[0], atol=1e-4)
    second = run(sd, num_images=1, seed=[a.seeds[1]], output_type="np")
    np.testing.assert_allclose(second.images[0], a.images[1], atol=1e-4)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_schedulers(sd, name):
    a = run(sd, scheduler=name, seed=1)
    assert torch.isfinite(a.images).all() and a.images.abs().max() > 0
    if name == "euler_ancestral":  # stochastic steps draw from the per-image generators too
        torch.testing.assert_close(a.images, run(sd, scheduler=name, seed=1).images, atol=0, rtol=0)


def test_sdxl_empty_negative_prompt_is_zeros(sdxl):
    from prcore.method.families import family_of
    from prcore.method.sampler import _encode

    family = family_of(sdxl)
    assert family.name == "sdxl" and family.zero_negative(sdxl, "") and not family.zero_negative(sdxl, "blue")
    zero = _encode(sdxl, family, "", adapters.BASE, 2, "cpu", zero=True).text
    assert zero.embeds.abs().max() == 0 and zero.pooled.abs().max() == 0 and zero.embeds.shape[0] == 2
    # a non-empty negative prompt is encoded normally
    neg = run(sdxl, negative_prompt="blue", seed=4).images
    assert (neg - run(sdxl, seed=4).images).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "a dog in the snow"}, r"no \{subject\} placeholder"),
        ({"adapter_name": "nope"}, r"unknown adapter 'nope'.*loaded into this pipeline: subj"),
        ({"adapter_name": None}, "needs adapter_name"),
        ({"scheduler": "warp"}, r"unknown scheduler 'warp'; choose one of: ddim, euler, euler_ancestral, dpmpp_2m"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a number >= 0"),
        ({"consistency_scale": -0.5}, "consistency_scale must be a number >= 0"),
        ({"parallel_scale": -0.1}, "parallel_scale must be a number >= 0"),
        ({"height": 30}, "height=30 must be a positive multiple of the VAE factor 4"),
        ({"width": 33}, "width=33 must be a positive multiple of the VAE factor 4"),
        ({"guidance": "magic"}, "unknown guidance 'magic'; choose one of: parallel_rescaled, consistency, cfg, pretrained"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an int >= 1"),
        ({"num_images": 2, "seed": [1]}, "one seed per image"),
        ({"seed": -3}, "seed must be >= 0"),
        ({"output_type": "jpeg"}, "output_type must be one of"),
    ],
)
def test_bad_arguments(sd, kwargs, message):
    with pytest.raises(SamplerError, match=message) as info:
        run(sd, **kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_pretrained_mode_matches_diffusers_own_pipeline(kind, request):
    """guidance='pretrained' is CFG of the base model: the same pixels as the pipeline's own __call__."""
    pipe = request.getfixturevalue(f"tiny_{kind}")  # the shared pipeline, no adapters; read-only use
    ours = sample(pipe, prompt=PROMPT, class_noun="dog", identifier="sks", adapter_name=None, guidance="pretrained",
                  guidance_scale=6.0, num_inference_steps=4, height=SIZE, width=SIZE, seed=8, num_images=2, output_type="np", progress=False)
    theirs = pipe(ours.base_prompt, num_inference_steps=4, guidance_scale=6.0, height=SIZE, width=SIZE, num_images_per_prompt=2,
                  generator=[torch.Generator().manual_seed(s) for s in ours.seeds], output_type="np").images
    assert np.abs(ours.images - ours.images.mean()).max() > 0.05
    np.testing.assert_allclose(ours.images, theirs, atol=1e-4)


def test_int_seed_draws_what_a_manifest_row_with_that_seed_draws():
    from prcore.data.fingerprint import image_seed

    assert image_seeds(1234, 3) == [image_seed(1234, i) for i in range(3)]


def test_consistency_window_runs_two_rows_outside_it(sd):
    full = run(sd, num_inference_steps=4, seed=6)
    assert full.unet_rows == 3 * 4
    same = run(sd, num_inference_steps=4, seed=6, consistency_start=0.0, consistency_stop=1.0)
    torch.testing.assert_close(same.images, full.images, atol=0, rtol=0)
    half = run(sd, num_inference_steps=4, seed=6, consistency_start=0.0, consistency_stop=0.5)
    assert half.unet_rows == 3 * 2 + 2 * 2 and (half.images - full.images).abs().max() > 1e-4
    # outside the window the estimate is CFG of the LoRA on the personal prompt against the base negative
    none = run(sd, num_inference_steps=4, seed=6, consistency_start=0.0, consistency_stop=0.0)
    assert none.unet_rows == 2 * 4
    from prcore.data.schema import GenerationDefaults

    product = sample(sd, prompt=PROMPT, class_noun="dog", identifier="sks", adapter_name=ADAPTER, num_inference_steps=4, seed=6,
                     height=SIZE, width=SIZE, progress=False, output_type="latent")  # the library's default: the product's
    assert (GenerationDefaults().consistency_start, GenerationDefaults().consistency_stop) == (0.0, 0.5)
    assert product.unet_rows == half.unet_rows and torch.equal(product.images, half.images)
    chunked = run(sd, num_inference_steps=4, seed=6, consistency_start=0.0, consistency_stop=0.5, max_batch_rows=1)
    torch.testing.assert_close(chunked.images, half.images, atol=ATOL, rtol=0)
    for window in ((0.6, 0.4), (-0.1, 1.0), (0.0, 1.2)):
        with pytest.raises(SamplerError, match="consistency window"):
            run(sd, consistency_start=window[0], consistency_stop=window[1])
    assert run(sd, guidance="cfg", consistency_stop=0.5).unet_rows == 2 * 2  # modes without a window ignore it


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("batch_mode", ["auto", "separate"])
def test_several_requests_and_subjects_in_one_loop_draw_what_each_draws_alone(kind, batch_mode, request, tmp_path):
    """Three requests in ONE denoising loop: two prompts of one subject and one of a second subject
    with its own LoRA (rows routed per sample). Each image equals the one-request path's for its seed."""
    from prcore.method.sampler import Request, sample_batch

    pipe = request.getfixturevalue(kind)
    other = tmp_path / "other"
    save_random_lora(request.getfixturevalue(f"tiny_{kind}_path"), other, seed=321)
    pipe.load_lora_weights(str(other), adapter_name="other", use_safetensors=True)
    try:
        reqs = [Request(PROMPT, "dog", "sks", ADAPTER, image_seeds(3, 2)),
                Request("a {subject} on the beach", "dog", "sks", ADAPTER, image_seeds(4, 1)),
                Request("a {subject} in a field", "cat", "zwx", "other", image_seeds(5, 2))]
        common = dict(num_inference_steps=2, height=SIZE, width=SIZE, progress=False, batch_mode=batch_mode)
        batched = sample_batch(pipe, reqs, output_type="latent", **common)
        assert [o.images.shape[0] for o in batched] == [2, 1, 2] and batched[0].extra["batch_images"] == 5
        alone = [sample(pipe, prompt=r.prompt, class_noun=r.class_noun, identifier=r.identifier, adapter_name=r.adapter_name,
                        seed=r.seeds, num_images=len(r.seeds), output_type="latent", **common) for r in reqs]
        for b, a in zip(batched, alone, strict=True):
            assert b.seeds == a.seeds and b.personal_prompt == a.personal_prompt
            torch.testing.assert_close(b.images, a.images, atol=ATOL, rtol=0)
        assert (alone[2].images - sample(pipe, prompt=reqs[2].prompt, class_noun="cat", identifier="zwx", adapter_name=ADAPTER,
                                         seed=reqs[2].seeds, num_images=2, output_type="latent", **common).images).abs().max() > 1e-3
        # and as pixels: the PNG a request gets is the one it gets alone
        px = sample_batch(pipe, reqs[:2], output_type="np", **common)
        px_alone = sample(pipe, prompt=reqs[1].prompt, class_noun="dog", identifier="sks", adapter_name=ADAPTER,
                          seed=reqs[1].seeds, num_images=1, output_type="np", **common)
        assert np.abs(np.round(px[1].images * 255) - np.round(px_alone.images * 255)).max() <= 1
    finally:
        pipe.delete_adapters("other")


def test_routing_takes_a_lora_whose_a_and_b_differ_in_dtype():
    """bf16 base weights with an fp32 lora_B (as a LoRA filled in fp32 on a bf16 model): the routed rows
    get exactly peft's own LoRA output, the base rows none."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["0"]),
                                    torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16), adapter_name="s")
    layer = model[0]
    layer.lora_B["s"].weight.data = torch.randn(8, 2)  # fp32, A stays bf16
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.no_grad(), adapters.per_sample_adapters(model, [adapters.BASE, "s"]):
        routed = model(x)
    with torch.no_grad():
        base = layer.base_layer(x)
        lora = base + layer.lora_B["s"](layer.lora_A["s"](x).float()).to(base.dtype) * layer.scaling["s"]
    assert torch.equal(routed[0], base[0]) and (lora[1] - base[1]).abs().max() > 0.1
    torch.testing.assert_close(routed[1], lora[1], atol=2e-2, rtol=0)
