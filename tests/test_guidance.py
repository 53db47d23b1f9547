"""Properties of the guidance equations (prcore.method.guidance)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prcore.method.guidance import TINY, consistency, decompose, parallel_fraction, parallel_rescaled

shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5))
scales = st.floats(0.0, 12.0, allow_nan=False)


def _tensors(seed: int, shape, n: int, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), mag=st.floats(1e-3, 1e3))
def test_decompose_sums_back_and_is_orthogonal(shape, seed, mag):
    g, d = _tensors(seed, shape, 2, torch.float64, mag)
    parallel, orthogonal = decompose(g, d)
    torch.testing.assert_close(parallel + orthogonal, g, rtol=1e-10, atol=1e-10 * mag)
    dots = (orthogonal * d).flatten(1).sum(1)
    gn, dn = g.flatten(1).norm(dim=1), d.flatten(1).norm(dim=1)
    # rounding, plus the exact effect of the tiny constant in the denominator: <g,d> tiny / ||d||^2
    bound = 1e-9 * gn * dn + 2 * TINY * gn / dn
    assert (dots.abs() <= bound).all()
    # parallel is a per-sample multiple of d
    cos = torch.nn.functional.cosine_similarity(parallel.flatten(1), d.flatten(1), dim=1).abs()
    nonzero = parallel.flatten(1).norm(dim=1) > 1e-9 * mag
    assert torch.allclose(cos[nonzero], torch.ones_like(cos[nonzero]), atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_decompose_is_per_sample(shape, seed):
    """Scaling one sample's direction or g changes nothing for the other samples."""
    g, d = _tensors(seed, shape, 2, torch.float64)
    p1, o1 = decompose(g, d)
    d2 = d.clone()
    d2[0] *= 7.0
    g2 = g.clone()
    g2[0] *= -3.0
    p2, o2 = decompose(g2, d2)
    torch.testing.assert_close(p1[1:], p2[1:])
    torch.testing.assert_close(o1[1:], o2[1:])
    torch.testing.assert_close(p2[0], -3.0 * p1[0])


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_zero_direction_gives_zero_parallel_and_no_nan(shape, seed, dtype):
    (g,) = _tensors(seed, shape, 1, dtype)
    parallel, orthogonal = decompose(g, torch.zeros_like(g))
    assert torch.isfinite(parallel).all() and torch.isfinite(orthogonal).all()
    assert (parallel == 0).all()
    assert torch.equal(orthogonal, g)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), w_cfg=scales, w_cg=scales)
def test_parallel_scale_one_is_dco_consistency_guidance(shape, seed, w_cfg, w_cg):
    e_u, e_c, e_p = _tensors(seed, shape, 3, torch.float64)
    ours = parallel_rescaled(e_u, e_c, e_p, guidance_scale=w_cfg, consistency_scale=w_cg, parallel_scale=1.0)
    dco = e_u + w_cfg * (e_c - e_u) + w_cg * (e_p - e_c)
    torch.testing.assert_close(ours, dco, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(consistency(e_u, e_c, e_p, guidance_scale=w_cfg, consistency_scale=w_cg), dco)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), w_cfg=scales, eta=st.floats(0, 2))
def test_zero_consistency_scale_is_plain_cfg(shape, seed, w_cfg, eta):
    e_u, e_c, e_p = _tensors(seed, shape, 3, torch.float64)
    ours = parallel_rescaled(e_u, e_c, e_p, guidance_scale=w_cfg, consistency_scale=0.0, parallel_scale=eta)
    torch.testing.assert_close(ours, e_u + w_cfg * (e_c - e_u), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), w_cfg=scales, w_cg=scales, eta=st.floats(0, 2))
def test_parallel_rescaled_matches_equation(shape, seed, w_cfg, w_cg, eta):
    """Reference written out independently, per sample with flattened vectors."""
    e_u, e_c, e_p = _tensors(seed, shape, 3, torch.float64)
    out = parallel_rescaled(e_u, e_c, e_p, guidance_scale=w_cfg, consistency_scale=w_cg, parallel_scale=eta)
    for b in range(shape[0]):
        u, c, p = e_u[b].flatten(), e_c[b].flatten(), e_p[b].flatten()
        gcfg, gcg = c - u, p - c
        par = (gcg @ gcfg) / (gcfg @ gcfg + 1e-12) * gcfg
        expected = u + w_cfg * gcfg + w_cg * ((gcg - par) + eta * par)
        torch.testing.assert_close(out[b].flatten(), expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), eta=st.floats(0, 1))
def test_eta_only_changes_the_parallel_part(shape, seed, eta):
    """e_hat(eta) - e_hat(1) = w_cg (eta - 1) g_par, i.e. lies along g_cfg."""
    e_u, e_c, e_p = _tensors(seed, shape, 3, torch.float64)
    a = parallel_rescaled(e_u, e_c, e_p, guidance_scale=5.0, consistency_scale=2.0, parallel_scale=eta)
    b = parallel_rescaled(e_u, e_c, e_p, guidance_scale=5.0, consistency_scale=2.0, parallel_scale=1.0)
    diff = (a - b).flatten(1)
    g_cfg = (e_c - e_u).flatten(1)
    cos = torch.nn.functional.cosine_similarity(diff, g_cfg, dim=1).abs()
    moved = diff.norm(dim=1) > 1e-9
    assert torch.allclose(cos[moved], torch.ones_like(cos[moved]), atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_low_precision_inputs_accumulate_in_float32(seed, dtype):
    """fp16/bf16 in, same dtype out, and the value equals the float32 computation of the same inputs."""
    shape = (2, 4, 16, 16)
    e_u, e_c, e_p = _tensors(seed, shape, 3, dtype, 60.0)  # large values: fp16 dot products would overflow
    out = parallel_rescaled(e_u, e_c, e_p, guidance_scale=7.5, consistency_scale=3.0, parallel_scale=0.5)
    assert out.dtype == dtype
    ref = parallel_rescaled(e_u.float(), e_c.float(), e_p.float(), guidance_scale=7.5, consistency_scale=3.0, parallel_scale=0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    p, o = decompose(e_p - e_c, e_c - e_u)
    assert p.dtype == dtype and torch.isfinite(p).all()


def test_shape_mismatch_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="same shape"):
        decompose(torch.zeros(1, 2), torch.zeros(1, 3))


def test_parallel_fraction_is_cosine():
    e_u = torch.zeros(2, 3)
    e_c = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
    e_p = e_c + torch.tensor([[2.0, 0, 0], [0, 1.0, 0]])
    torch.testing.assert_close(parallel_fraction(e_u, e_c, e_p), torch.tensor([1.0, 0.0]))
