"""Quantizer numbers: the grid, straight-through and LSQ gradients, qparams, bit-width limits, range methods."""

from __future__ import annotations

import pytest
import torch

from hf_adaquant import AdaQuantConfig
from hf_adaquant.quant import Quantizer, RangeObserver, compute_range, fake_quantize, qrange, round_ste
from hf_adaquant.quant.functional import qparams_from_range, quantize_to_int


def _grid_codes(y: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """``q`` such that ``y = (q - zp) * scale`` (float64 to make the integrality check meaningful)."""
    return y.double() / scale.double() + zp.double()


# ---------------------------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_fake_quantize_output_lies_on_the_grid(bits: int, signed: bool, device: torch.device) -> None:
    g = torch.Generator().manual_seed(bits)
    qmin, qmax = qrange(bits, signed)
    scale = torch.tensor(0.37, device=device)
    x = (torch.randn(4000, generator=g) * 0.37 * 2 ** (bits - 1)).to(device)
    zp = torch.tensor(0.0 if signed else float(2 ** (bits - 1) - 1), device=device)
    y = fake_quantize(x, scale, zp, qmin, qmax)
    q = _grid_codes(y, scale, zp)
    assert torch.allclose(q, q.round(), atol=1e-4), "outputs are not integer multiples of the step"
    assert q.round().min() >= qmin and q.round().max() <= qmax
    # Grid is actually used end to end (data is wider than the range), and in-range values round to nearest.
    assert q.round().min() == qmin and q.round().max() == qmax
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
    inside = (x > lo) & (x < hi)
    assert (y[inside] - x[inside]).abs().max() <= scale / 2 + 1e-6
    assert torch.equal(y[x >= hi + scale], torch.full_like(y[x >= hi + scale], float(hi)))
    # The documented relation to the integer codes.
    codes = quantize_to_int(x, scale, zp, qmin, qmax)
    assert torch.allclose(y, (codes - zp) * scale)


def test_qrange_values() -> None:
    assert qrange(4, signed=False) == (0, 15)
    assert qrange(4, signed=True) == (-8, 7)
    assert qrange(8, signed=True) == (-128, 127)
    assert qrange(2, signed=False) == (0, 3)


def test_zero_point_is_rounded_in_forward() -> None:
    x = torch.linspace(-1, 1, 101)
    scale = torch.tensor(0.1)
    y_frac = fake_quantize(x, scale, torch.tensor(7.4), 0, 15)
    y_int = fake_quantize(x, scale, torch.tensor(7.0), 0, 15)
    assert torch.equal(y_frac, y_int)


# ------------------------------------------------------------------------------------------------ gradients


def test_round_ste_value_and_identity_gradient() -> None:
    x = torch.tensor([-2.7, -0.5001, 0.2, 0.49, 1.51, 3.0], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    weights = torch.arange(1.0, 7.0)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)


def _fq_setup(bits: int = 4):
    qmin, qmax = 0, 2**bits - 1
    scale, zp = 0.25, 5.0
    # x/s + zp well inside [qmin, qmax] (away from the clamp edges) and well outside on both sides.
    t_inside = torch.tensor([1.3, 2.1, 4.9, 5.0, 7.6, 9.2, 12.45, 13.8])
    t_above = torch.tensor([17.3, 20.0, 31.7])
    t_below = torch.tensor([-2.2, -4.9, -9.0])
    t = torch.cat([t_inside, t_above, t_below])
    x = (t - zp) * scale
    region = torch.cat([torch.zeros(len(t_inside)), torch.ones(len(t_above)), -torch.ones(len(t_below))])
    return x, scale, zp, qmin, qmax, region


def test_gradient_wrt_x_is_one_inside_and_zero_outside() -> None:
    x, scale, zp, qmin, qmax, region = _fq_setup()
    x = x.clone().requires_grad_(True)
    fake_quantize(x, torch.tensor(scale), torch.tensor(zp), qmin, qmax).sum().backward()
    assert torch.equal(x.grad[region == 0], torch.ones(int((region == 0).sum())))
    assert torch.equal(x.grad[region != 0], torch.zeros(int((region != 0).sum())))


def test_lsq_scale_gradient_analytic_and_finite_difference() -> None:
    x, scale, zp, qmin, qmax, region = _fq_setup()
    # One step per element, so each element's gradient is visible on its own.
    s = torch.full_like(x, scale, dtype=torch.float64).requires_grad_(True)
    x64 = x.double()
    zp_t = torch.tensor(zp, dtype=torch.float64)
    fake_quantize(x64, s, zp_t, qmin, qmax).sum().backward()
    ratio = x64 / scale
    expected = torch.where(region == 0, torch.round(ratio) - ratio,
                           torch.where(region > 0, torch.tensor(qmax - zp).double(), torch.tensor(qmin - zp).double()))
    assert torch.allclose(s.grad, expected, atol=1e-9)
    # Outside the range the clamped output is (qmax - zp) * s or (qmin - zp) * s: a smooth function of s, so
    # the LSQ gradient there is the true derivative; check it by central differences.
    h = 1e-6
    with torch.no_grad():
        plus = fake_quantize(x64, s + h, zp_t, qmin, qmax)
        minus = fake_quantize(x64, s - h, zp_t, qmin, qmax)
    fd = (plus - minus) / (2 * h)
    outside = region != 0
    assert torch.allclose(fd[outside], s.grad[outside], atol=1e-5)
    # Inside, the LSQ gradient differs from the (piecewise) true derivative round(x/s): it is the STE estimate.
    inside = region == 0
    assert not torch.allclose(fd[inside], s.grad[inside])


def test_quantizer_scale_gradient_sums_per_channel() -> None:
    q = Quantizer(4, channel_axis=0, num_channels=2)
    w = torch.tensor([[0.1, -0.3, 0.52, 0.77], [1.0, -2.0, 0.4, 3.3]])
    q.set_range(w.amin(1), w.amax(1))
    # Shrink the steps so some values are clipped, then compare with the per-element formula.
    with torch.no_grad():
        q.scale.mul_(0.7)
    q(w).sum().backward()
    s = q.scale.detach()[:, None]
    zp = torch.round(q.zero_point.detach())[:, None]
    pre = torch.round(w / s) + zp
    per_elem = torch.where(pre > q.qmax, q.qmax - zp, torch.where(pre < q.qmin, q.qmin - zp,
                                                                   torch.round(w / s) - w / s))
    assert torch.allclose(q.scale.grad, per_elem.sum(1), atol=1e-5)
    # The zero-point gets the STE gradient: zero inside, -s outside.
    zp_grad = torch.where((pre > q.qmax) | (pre < q.qmin), -s, torch.zeros_like(w)).sum(1)
    assert torch.allclose(q.zero_point.grad, zp_grad, atol=1e-6)


# -------------------------------------------------------------------------------------- per channel / tensor


def test_per_channel_equals_row_by_row_per_tensor(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 3, 3, generator=g) * torch.tensor([0.01, 0.1, 1.0, 5.0, 0.5, 2.0])[:, None, None, None]
    w = w.to(device)
    pc = Quantizer(4, channel_axis=0, num_channels=6).to(device)
    flat = w.reshape(6, -1)
    pc.set_range(flat.amin(1), flat.amax(1))
    y = pc(w)
    for c in range(6):
        pt = Quantizer(4).to(device)
        pt.set_range(flat[c].min().reshape(1), flat[c].max().reshape(1))
        assert torch.allclose(y[c], pt(w[c]), atol=1e-7), c
    # A single per-tensor grid wipes out the small channels; per-channel keeps them within half a step.
    pt = Quantizer(4).to(device)
    pt.set_range(flat.min().reshape(1), flat.max().reshape(1))
    small_pc = (y[0] - w[0]).abs().max()
    small_pt = (pt(w)[0] - w[0]).abs().max()
    assert small_pc <= pc.scale[0] / 2 + 1e-7
    assert small_pt > 10 * small_pc
    assert pc.scale.shape == (6,) and pt.scale.shape == (1,)


def test_set_range_rejects_wrong_channel_count() -> None:
    q = Quantizer(4, channel_axis=0, num_channels=3)
    with pytest.raises(ValueError, match="channels"):
        q.set_range(torch.zeros(4), torch.ones(4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_set_range_refuses_non_finite_bounds(bad: float) -> None:
    """An inf bound used to give an inf step (every output NaN); now it is refused and the quantizer untouched."""
    lo, hi = (torch.tensor([bad]), torch.tensor([1.0])) if bad < 0 else (torch.tensor([-1.0]), torch.tensor([bad]))
    q = Quantizer(8)
    with pytest.raises(ValueError, match="non-finite bounds"):
        q.set_range(lo, hi)
    assert not bool(q.initialized)
    pc = Quantizer(4, channel_axis=0, num_channels=3)
    with pytest.raises(ValueError, match="1 of 3 channels non-finite"):
        pc.set_range(torch.tensor([0.0, bad, 0.0]), torch.ones(3))


# ---------------------------------------------------------------------------------------------- qparams


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_qparams_zero_exact_and_range_covered(bits: int, symmetric: bool) -> None:
    lo = torch.tensor([-1.0, -0.013, 0.2, -5.0, -3.7, 0.0, -2.0])
    hi = torch.tensor([1.0, 2.9, 0.9, -0.5, 0.011, 4.0, 2.0])
    scale, zp, signed = qparams_from_range(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, signed)
    assert torch.all(scale > 0)
    assert torch.equal(zp, zp.round()) and torch.all(zp >= qmin) and torch.all(zp <= qmax)
    if symmetric:
        assert torch.all(zp == 0)
        assert signed  # some lo < 0
    else:
        assert not signed and (qmin, qmax) == (0, 2**bits - 1)
    s, z = scale[:, None], zp[:, None]
    # Zero is exactly representable (padding / ReLU zeros quantize without error).
    zeros = torch.zeros(len(lo), 1)
    assert torch.equal(fake_quantize(zeros, s, z, qmin, qmax), zeros)
    # Every value of [min(lo, 0), max(hi, 0)] is within half a step of the grid: the range is covered and
    # clipping error at the ends never exceeds rounding error.
    t = torch.linspace(0, 1, 501)[None, :]
    lo0, hi0 = torch.minimum(lo, torch.zeros(1))[:, None], torch.maximum(hi, torch.zeros(1))[:, None]
    xs = lo0 + (hi0 - lo0) * t
    err = (fake_quantize(xs, s, z, qmin, qmax) - xs).abs()
    assert torch.all(err <= s / 2 * (1 + 1e-5) + 1e-7)


def test_qparams_symmetric_unsigned_for_nonnegative_range() -> None:
    scale, zp, signed = qparams_from_range(torch.tensor([0.0, 0.5]), torch.tensor([3.0, 6.0]), 4, True)
    assert not signed and torch.all(zp == 0)
    assert torch.allclose(scale, torch.tensor([3.0, 6.0]) / 15)
    scale, _, signed = qparams_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), 4, True)
    assert signed and torch.allclose(scale, torch.tensor([3.0 / 7]))


def test_quantizer_signedness_follows_range() -> None:
    q = Quantizer(4, symmetric=True)
    q.set_range(torch.tensor([0.0]), torch.tensor([1.5]))
    assert (q.qmin, q.qmax) == (0, 15)
    q.set_range(torch.tensor([-1.0]), torch.tensor([1.5]))
    assert (q.qmin, q.qmax) == (-8, 7)
    assert not q.zero_point.requires_grad
    assert Quantizer(4, symmetric=False).zero_point.requires_grad


# ------------------------------------------------------------------------------------------- bit-widths


@pytest.mark.parametrize("bits", range(2, 9))
def test_bits_2_to_8_accepted(bits: int) -> None:
    q = Quantizer(bits)
    q.set_range(torch.tensor([-1.0]), torch.tensor([1.0]))
    y = q(torch.linspace(-1.2, 1.2, 1000))
    assert y.unique().numel() == 2**bits  # every level of the grid is used, no more
    AdaQuantConfig(weight_bits=bits, activation_bits=bits, first_last_bits=bits, layer_bits={"a": (bits, bits)})


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_outside_2_to_8_rejected(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        Quantizer(bits)
    with pytest.raises(ValueError, match="weight_bits"):
        AdaQuantConfig(weight_bits=bits)
    with pytest.raises(ValueError, match="activation_bits"):
        AdaQuantConfig(activation_bits=bits)
    with pytest.raises(ValueError, match="first_last_bits"):
        AdaQuantConfig(first_last_bits=bits)
    with pytest.raises(ValueError, match="layer_bits"):
        AdaQuantConfig(layer_bits={"conv1": (4, bits)})


def test_quantizer_before_set_range_raises() -> None:
    q = Quantizer(4)
    with pytest.raises(RuntimeError, match="range"):
        q(torch.randn(3))
    q.enabled = False  # disabled quantizers are identities and need no range
    x = torch.randn(3)
    assert torch.equal(q(x), x)


def test_int_codes_match_fake_quantize(device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 20, generator=g).to(device)
    q = Quantizer(3, channel_axis=0, num_channels=5).to(device)
    q.set_range(w.amin(1) * 0.8, w.amax(1) * 0.8)
    codes = q.int_codes(w)
    assert torch.equal(codes, codes.round()) and codes.min() >= q.qmin and codes.max() <= q.qmax
    recon = (codes - q.zero_point.round()[:, None]) * q.scale[:, None]
    assert torch.allclose(q(w), recon, atol=1e-6)


# ------------------------------------------------------------------------------------------- range methods


def _laplace(*shape: int, seed: int) -> torch.Tensor:
    """Laplace(0, 1) samples: heavier tails than a Gaussian, like many weights and pre-activations."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(*shape, generator=g).clamp(min=1e-12)
    sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
    return -torch.log(u) * sign


def _quant_mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> float:
    scale, zp, signed = qparams_from_range(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, signed)
    return (fake_quantize(x, scale[:, None], zp[:, None], qmin, qmax) - x).pow(2).mean().item()


def test_minmax_range_per_row() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, 0.75]])
    lo, hi = compute_range("minmax", x, bits=4, symmetric=False)
    assert torch.equal(lo, torch.tensor([-2.0, 0.25])) and torch.equal(hi, torch.tensor([3.0, 0.75]))


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_beats_minmax_on_heavy_tails(symmetric: bool) -> None:
    x = _laplace(4, 20000, seed=0)
    lo_mm, hi_mm = compute_range("minmax", x, bits=4, symmetric=symmetric)
    lo_mse, hi_mse = compute_range("mse", x, bits=4, symmetric=symmetric)
    assert torch.all(hi_mse <= hi_mm) and torch.all(lo_mse >= lo_mm)
    assert torch.all(hi_mse < hi_mm)  # outliers get clipped
    err_mm = _quant_mse(x, lo_mm, hi_mm, 4, symmetric)
    err_mse = _quant_mse(x, lo_mse, hi_mse, 4, symmetric)
    assert err_mse < 0.5 * err_mm


def test_mse_range_keeps_minmax_on_uniform_data() -> None:
    # Without outliers there is nothing to clip: the search must not make the error worse than min-max.
    x = torch.linspace(-1, 1, 4001)[None, :]
    lo_mm, hi_mm = compute_range("minmax", x, bits=4, symmetric=False)
    lo, hi = compute_range("mse", x, bits=4, symmetric=False)
    assert _quant_mse(x, lo, hi, 4, False) <= _quant_mse(x, lo_mm, hi_mm, 4, False) + 1e-12
    assert hi > 0.8


def test_percentile_range() -> None:
    x = torch.arange(10001, dtype=torch.float32)[None, :] - 5000.0  # -5000..5000
    lo, hi = compute_range("percentile", x, bits=8, symmetric=False, percentile=99.0)
    assert abs(hi.item() - 4900.0) < 1.0 and abs(lo.item() + 4900.0) < 1.0


def test_unknown_range_method_rejected() -> None:
    with pytest.raises(ValueError, match="unknown range method"):
        compute_range("kl_divergence", torch.randn(1, 10), bits=4, symmetric=False)
    with pytest.raises(ValueError, match="activation_range_method"):
        AdaQuantConfig(activation_range_method="kl_divergence")
    with pytest.raises(ValueError, match="weight_range_method"):
        AdaQuantConfig(weight_range_method="mean_minmax")


def test_range_observer_minmax_and_mean_minmax() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 4, 5, 5, generator=g) * (i + 1) for i in range(3)]
    obs = RangeObserver(seed=0)
    with pytest.raises(RuntimeError):
        obs.compute("minmax", bits=4, symmetric=False)
    for b in batches:
        obs.update(b)
    every = torch.cat(batches)
    lo, hi = obs.compute("minmax", bits=4, symmetric=False)
    assert lo.item() == pytest.approx(every.min().item()) and hi.item() == pytest.approx(every.max().item())
    per_sample = every.reshape(len(every), -1)
    lo, hi = obs.compute("mean_minmax", bits=4, symmetric=False)
    assert lo.item() == pytest.approx(per_sample.amin(1).mean().item(), rel=1e-5)
    assert hi.item() == pytest.approx(per_sample.amax(1).mean().item(), rel=1e-5)
    # Average of per-sample extremes lies strictly inside the global extremes.
    assert every.min() < lo.item() < hi.item() < every.max()


def test_range_observer_mse_clips_heavy_tailed_activations() -> None:
    batches = [_laplace(16, 1000, seed=i) for i in range(4)]
    obs = RangeObserver(max_values=1 << 14, seed=0)
    for b in batches:
        obs.update(b)
    every = torch.cat(batches).reshape(1, -1)
    lo_mm, hi_mm = obs.compute("minmax", bits=4, symmetric=False)
    lo, hi = obs.compute("mse", bits=4, symmetric=False)
    assert hi < hi_mm and lo > lo_mm
    assert _quant_mse(every, lo, hi, 4, False) < 0.5 * _quant_mse(every, lo_mm, hi_mm, 4, False)


def test_range_observer_memory_is_bounded() -> None:
    obs = RangeObserver(max_values=640, seed=0)
    for _ in range(200):
        obs.update(torch.randn(4, 100))
    assert 0 < sum(v.numel() for v in obs._values) <= 640
    assert obs.num_samples == 800


def test_range_observer_update_parts_equals_update_of_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(30, 3, 7, generator=g) * (i + 1) for i in range(4)]
    whole, sliced = RangeObserver(max_values=300, seed=2), RangeObserver(max_values=300, seed=2)
    for b in batches:
        whole.update(b)
        sliced.update_parts((b[i:i + 7] for i in range(0, 30, 7)), b.numel())
    for field in ("min", "max", "sum_sample_min", "sum_sample_max", "num_samples"):
        assert getattr(whole, field) == getattr(sliced, field)
    assert torch.equal(torch.cat(whole._values), torch.cat(sliced._values))
    with pytest.raises(ValueError, match="not the 211 announced"):
        sliced.update_parts([batches[0]], 211)


def test_range_observer_refuses_nan_and_inf() -> None:
    """Python's min()/max() silently skip a NaN batch extreme: the observer must refuse it instead."""
    for bad in (float("nan"), float("inf")):
        obs = RangeObserver(seed=0)
        x = torch.randn(4, 10)
        x[2, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            obs.update(x)


def test_calibration_names_layer_and_batch_of_non_finite_activations() -> None:
    from torch import nn

    from hf_adaquant.calibrate import calibrate_activation_ranges, init_weight_range
    from hf_adaquant.nn import quantize_module

    class Blowup(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 1e38  # overflows float32 for |x| > ~3.4

    model = nn.Sequential(Blowup(), quantize_module(nn.Linear(4, 2), 8, 8)).eval()
    init_weight_range(model[1], "minmax", "1")
    batches = [torch.full((2, 4), 0.5), torch.full((2, 4), 10.0)]
    with pytest.raises(ValueError, match=r"input of layer '1' on calibration batch 1: .*NaN or inf"):
        calibrate_activation_ranges(model, batches, "minmax")
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"weight range of layer '1'.*non-finite"):
        init_weight_range(model[1], "minmax", "1")


# ------------------------------------------------------------------------------------------- test device


def test_device_fixture_follows_the_override() -> None:
    """``HF_ADAQUANT_TEST_DEVICE`` picks the device of device-ready tests; a bad value is a clear error."""
    from tests.conftest import DEVICE_ENV, resolve_test_device

    assert resolve_test_device({DEVICE_ENV: "cpu"}) == torch.device("cpu")
    default = resolve_test_device({})
    assert default.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=DEVICE_ENV):
        resolve_test_device({DEVICE_ENV: "not-a-device"})
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_test_device({DEVICE_ENV: f"cuda:{torch.cuda.device_count()}"})
