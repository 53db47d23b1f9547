"""GPU speed options on the tiny pipelines, with a LoRA loaded through peft (the per-row routing path):
channels-last and the attention kernel give the same latents; torch.compile too (slow: inductor on a CPU)."""

from __future__ import annotations

import pytest
import torch
from test_sampler import ADAPTER, _lora_pipe, run

from prcore.method.accel import DenoiserOptions, configure_denoiser


@pytest.fixture()
def pipe(tiny_sd_path, tmp_path):
    return _lora_pipe(tiny_sd_path, "sd", tmp_path / "lora")


def latents(pipe) -> torch.Tensor:
    return run(pipe, guidance="parallel_rescaled", num_images=2, seed=3).images


def test_channels_last_and_classic_attention_draw_the_same(pipe):
    plain = latents(pipe)
    applied = configure_denoiser(pipe, DenoiserOptions(channels_last=True))
    assert applied["channels_last"] and pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(latents(pipe), plain, atol=5e-4)  # rounding only: another conv kernel order
    configure_denoiser(pipe, DenoiserOptions(attention="classic"))
    procs = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert procs == {"AttnProcessor"} and pipe.unet.conv_in.weight.is_contiguous()  # back to NCHW
    assert torch.allclose(latents(pipe), plain, atol=5e-4)  # rounding only: another conv kernel order
    assert configure_denoiser(pipe, DenoiserOptions(attention="classic")) is pipe._prcore_accel  # idempotent
    with pytest.raises(ValueError, match="attention"):
        configure_denoiser(pipe, DenoiserOptions(attention="flash"))  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_unet_with_lora_routing_draws_the_same(pipe):
    plain = latents(pipe)
    assert configure_denoiser(pipe, DenoiserOptions(compile=True))["compile_backend"] == "inductor"  # the product default
    assert torch.allclose(latents(pipe), plain, atol=1e-4)
    with pytest.raises(ValueError, match="compiled"):
        configure_denoiser(pipe, DenoiserOptions())


@pytest.mark.slow
def test_compiled_unet_follows_an_adapter_change(pipe):
    """dynamo's guards see the adapter change and recompile. The same graph capture as inductor's, without its
    C++ code generation (two inductor compiles of the tiny UNet cost ~80 s each on a 2-core CPU)."""
    plain = latents(pipe)
    configure_denoiser(pipe, DenoiserOptions(compile=True, compile_backend="aot_eager"))
    assert torch.allclose(latents(pipe), plain, atol=1e-4)
    pipe.set_adapters([ADAPTER], adapter_weights=[0.0])  # an adapter change: dynamo guards recompile, results follow
    off = latents(pipe)
    assert not torch.allclose(off, plain, atol=1e-4)
    pipe.set_adapters([ADAPTER], adapter_weights=[1.0])
    assert torch.allclose(latents(pipe), plain, atol=1e-4)
