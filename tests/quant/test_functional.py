"""The fused fake quantization equals the reference ops: same outputs, gradients within float summation order."""

from __future__ import annotations

import pytest
import torch

from hf_adaquant.quant import Quantizer
from hf_adaquant.quant.functional import (_clamp_passes_bounds, fake_quantize, fake_quantize_reference,
                                          qrange)


def _grads(fn, x, scale, zp, g):
    x, scale, zp = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, scale, zp))
    out = fn(x, scale, zp, *QR)
    (out * g).sum().backward()
    return out.detach(), [None if t.grad is None else t.grad for t in (x, scale, zp)]


QR = (0, 15)


def _case(kind: str, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    if kind == "per_tensor":  # an input quantizer: x without gradient, learned step and zero-point
        x = torch.randn(6, 8, 9, 9, generator=gen, dtype=dtype) * 2
        scale = torch.tensor(0.31, dtype=dtype, requires_grad=True)
        zp = torch.tensor(6.4, dtype=dtype, requires_grad=True)
    elif kind == "per_channel":  # a weight quantizer: W' and the per-channel steps learn
        x = torch.randn(8, 5, 3, 3, generator=gen, dtype=dtype).requires_grad_(True)
        scale = (torch.rand(8, 1, 1, 1, generator=gen, dtype=dtype) * 0.2 + 0.05).requires_grad_(True)
        zp = torch.round(torch.rand(8, 1, 1, 1, generator=gen, dtype=dtype) * 15).requires_grad_(True)
    else:  # one step per element (as test_quant's analytic check), symmetric zero-point without gradient
        x = torch.randn(50, generator=gen, dtype=dtype).requires_grad_(True)
        scale = (torch.rand(50, generator=gen, dtype=dtype) * 0.3 + 0.1).requires_grad_(True)
        zp = torch.zeros((), dtype=dtype)
    # exact ties, grid ends and values just outside, where rounding and clipping decide
    with torch.no_grad():
        flat = x.view(-1)
        s = scale.expand_as(x).reshape(-1)
        z = zp.expand_as(x).reshape(-1).round()
        flat[:4] = (torch.tensor([0.5, 2.5, -0.5, 7.5], dtype=dtype) - z[:4]) * s[:4]
        flat[4:6] = (torch.tensor([QR[0], QR[1]], dtype=dtype) - z[4:6]) * s[4:6]
        flat[6:8] = (torch.tensor([QR[0] - 0.51, QR[1] + 0.51], dtype=dtype) - z[6:8]) * s[6:8]
    g = torch.randn(x.shape, generator=gen, dtype=dtype)
    return x, scale, zp, g


def _close(a: torch.Tensor, b: torch.Tensor, terms: torch.Tensor) -> bool:
    # A gradient is a sum of per-element terms: compare relative to the summed magnitudes (summation order).
    return bool(((a - b).abs() <= 1e-6 * terms + 1e-12).all())


@pytest.mark.parametrize("kind", ["per_tensor", "per_channel", "elementwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_reference(kind: str, dtype: torch.dtype) -> None:
    x, scale, zp, g = _case(kind, dtype)
    out_ref, grads_ref = _grads(fake_quantize_reference, x, scale, zp, g)
    out, grads = _grads(fake_quantize, x, scale, zp, g)
    assert torch.equal(out, out_ref)
    names = ("x", "scale", "zero_point")
    for name, a, b, t in zip(names, grads, grads_ref, (x, scale, zp)):
        assert (a is None) == (b is None) == (not t.requires_grad), name
        if a is None:
            continue
        assert a.shape == b.shape, name
        # upper bound of the summed magnitudes of the terms: |g| * (|x|/s + qmax + 1) * max(s, 1)
        bound = (g.abs() * (x.detach().abs() / scale.detach() + QR[1] + 1)).sum() * max(1.0, scale.max().item())
        assert _close(a, b, bound), (name, (a - b).abs().max().item())
    if kind == "per_tensor":  # the per-element formulas: no gradient to x's data; the scale's LSQ terms
        assert grads[0] is None


def test_fused_x_gradient_is_the_clip_mask() -> None:
    x, scale, zp, g = _case("per_channel")
    _, grads = _grads(fake_quantize, x, scale, zp, g)
    q = torch.round(x.detach() / scale.detach()) + zp.detach().round()
    # a value exactly on a grid end gets the gradient torch.clamp gives it (in recent torch: none)
    inside = (q >= QR[0]) & (q <= QR[1]) if _clamp_passes_bounds() else (q > QR[0]) & (q < QR[1])
    assert torch.equal(grads[0], g * inside)
    assert ((q == QR[0]) | (q == QR[1])).any()  # the case covers the bounds


def test_no_grad_path_equals_reference() -> None:
    x, scale, zp, _ = _case("per_channel")
    with torch.no_grad():
        assert torch.equal(fake_quantize(x, scale, zp, *QR), fake_quantize_reference(x, scale, zp, *QR))
    # signed symmetric grid
    xs = torch.randn(1000) * 3
    s = torch.tensor(0.05)
    z = torch.zeros(())
    qmin, qmax = qrange(4, True)
    assert torch.equal(fake_quantize(xs, s, z, qmin, qmax), fake_quantize_reference(xs, s, z, qmin, qmax))


def test_quantizer_training_steps_follow_the_reference() -> None:
    """A few Adam steps on a weight + input quantizer: the fused and reference paths stay within 1e-6."""
    torch.manual_seed(0)
    w0 = torch.randn(16, 32) * 0.1
    xs = torch.relu(torch.randn(64, 32))
    target = xs @ w0.T

    def train(fq) -> list[torch.Tensor]:
        wq = Quantizer(4, channel_axis=0, num_channels=16)
        iq = Quantizer(8)
        wq.set_range(w0.amin(1), w0.amax(1))
        iq.set_range(xs.min(), xs.max())
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.Adam([w, wq.scale, wq.zero_point, iq.scale, iq.zero_point], lr=1e-3)
        for _ in range(5):
            wqv = fq(w, wq.broadcast(wq.step(), w), wq.broadcast(wq.zero_point, w), wq.qmin, wq.qmax)
            xq = fq(xs, iq.step().reshape(()), iq.zero_point.reshape(()), iq.qmin, iq.qmax)
            loss = torch.nn.functional.mse_loss(xq @ wqv.T, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [t.detach().clone() for t in (w, wq.scale, wq.zero_point, iq.scale, iq.zero_point)]

    for a, b in zip(train(fake_quantize), train(fake_quantize_reference)):
        # Adam moves each value by ~lr = 1e-3 per step: the paths agree to 1e-6, a thousandth of one step
        assert (a - b).abs().max() <= 1e-6


def test_channels_last_input_gives_the_same_values_and_gradients() -> None:
    x, scale, zp, g = _case("per_tensor")
    out_ref, grads_ref = _grads(fake_quantize_reference, x, scale, zp, g)
    cl = torch.channels_last
    out, grads = _grads(fake_quantize, x.contiguous(memory_format=cl), scale, zp, g.contiguous(memory_format=cl))
    assert out.is_contiguous(memory_format=cl)  # the layout is kept for the convolution that follows
    assert torch.equal(out, out_ref)
    for a, b in zip(grads[1:], grads_ref[1:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-3), (a, b)  # sums of ~4000 terms of size ~1
