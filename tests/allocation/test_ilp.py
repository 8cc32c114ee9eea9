"""Tests of the integer-programming bit allocation (``hf_adaquant.allocation.ilp``)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from hf_adaquant.allocation import solver
from hf_adaquant.allocation import (
    AllocationProblem,
    BitOption,
    InfeasibleBudgetError,
    bops_of,
    size_of,
    solve_allocation,
    uniform_allocation,
)

OPTIONS = [BitOption(2, 4), BitOption(4, 4), BitOption(4, 8), BitOption(8, 8)]


def random_problem(seed: int, num_layers: int = 5, *, nan_frac: float = 0.15, pin: bool = False) -> AllocationProblem:
    """Small random instance; some disallowed (nan) options, some negative sensitivities, optional pins."""
    rng = np.random.default_rng(seed)
    k = len(OPTIONS)
    sens = rng.normal(1.0, 1.0, size=(num_layers, k)) * rng.lognormal(0.0, 1.0, size=(num_layers, 1))
    sens[rng.random((num_layers, k)) < nan_frac] = np.nan
    for l in range(num_layers):  # keep at least one allowed option per layer
        if np.isnan(sens[l]).all():
            sens[l, rng.integers(k)] = rng.random()
    pinned: dict[str, BitOption] = {}
    if pin:
        l = int(rng.integers(num_layers))
        allowed = np.flatnonzero(~np.isnan(sens[l]))
        pinned[f"layer{l}"] = OPTIONS[int(rng.choice(allowed))]
    return AllocationProblem(
        layer_names=[f"layer{i}" for i in range(num_layers)],
        options=OPTIONS,
        sensitivity=sens,
        num_params=rng.integers(10, 5000, size=num_layers),
        macs=rng.integers(1_000, 1_000_000, size=num_layers).astype(np.float64),
        pinned=pinned,
    )


def enumerate_all(problem: AllocationProblem) -> dict[str, np.ndarray]:
    """Every allowed assignment with its objective, size (bits) and BOPs."""
    num_layers, num_options = problem.sensitivity.shape
    combos = np.array(list(itertools.product(range(num_options), repeat=num_layers)), dtype=np.int64)
    rows = np.arange(num_layers)[None, :]
    allowed = problem.allowed_mask()[rows, combos].all(axis=1)
    combos = combos[allowed]
    return {
        "combos": combos,
        "objective": problem.effective_sensitivity()[rows, combos].sum(axis=1),
        "size": problem.size_matrix()[rows, combos].sum(axis=1),
        "bops": problem.bops_matrix()[rows, combos].sum(axis=1),
    }


def brute_force(problem: AllocationProblem, size_bits: float | None, bops_abs: float | None) -> float | None:
    """Optimal objective by enumeration (None when infeasible)."""
    table = enumerate_all(problem)
    ok = np.ones(len(table["combos"]), dtype=bool)
    if size_bits is not None:
        ok &= table["size"] <= size_bits
    if bops_abs is not None:
        ok &= table["bops"] <= bops_abs
    return float(table["objective"][ok].min()) if ok.any() else None


def min_max(problem: AllocationProblem, key: str) -> tuple[float, float]:
    table = enumerate_all(problem)
    return float(table[key].min()), float(table[key].max())


def assert_matches_brute_force(problem: AllocationProblem, size_bits: float | None, bops_abs: float | None) -> None:
    expected = brute_force(problem, size_bits, bops_abs)
    kwargs = {}
    if size_bits is not None:
        kwargs.update(size_budget=size_bits, size_budget_unit="bits")
    if bops_abs is not None:
        kwargs.update(bops_budget=bops_abs, bops_budget_unit="absolute")
    if expected is None:
        with pytest.raises(InfeasibleBudgetError):
            solve_allocation(problem, **kwargs)
        return
    alloc = solve_allocation(problem, **kwargs)
    assert alloc.optimal
    assert math.isclose(alloc.predicted_criterion, expected, rel_tol=1e-9, abs_tol=1e-12)
    # Reported totals are consistent with the assignment and respect the budgets.
    assert alloc.weight_bits_total == size_of(problem, alloc.assignment, "bits")
    assert math.isclose(alloc.bops, bops_of(problem, alloc.assignment), rel_tol=1e-12)
    if size_bits is not None:
        assert alloc.weight_bits_total <= size_bits
    if bops_abs is not None:
        assert alloc.bops <= bops_abs
    allowed = problem.allowed_mask()
    for l, name in enumerate(problem.layer_names):
        assert allowed[l, problem.options.index(alloc.assignment[name])]
    assert list(alloc.assignment) == problem.layer_names


# ------------------------------------------------------------------------------------------------------------
# Optimality
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(25))
def test_size_only_matches_brute_force(seed: int) -> None:
    problem = random_problem(seed, pin=seed % 3 == 0)
    lo, hi = min_max(problem, "size")
    rng = np.random.default_rng(1000 + seed)
    for budget in rng.uniform(lo, hi, size=3):
        assert_matches_brute_force(problem, float(budget), None)


@pytest.mark.parametrize("seed", range(25))
def test_size_and_bops_match_brute_force(seed: int) -> None:
    problem = random_problem(100 + seed, pin=seed % 4 == 0)
    s_lo, s_hi = min_max(problem, "size")
    b_lo, b_hi = min_max(problem, "bops")
    rng = np.random.default_rng(2000 + seed)
    for _ in range(3):
        assert_matches_brute_force(problem, float(rng.uniform(s_lo, s_hi)), float(rng.uniform(b_lo, b_hi)))


@pytest.mark.parametrize("seed", range(10))
def test_bops_only_matches_brute_force(seed: int) -> None:
    problem = random_problem(200 + seed)
    lo, hi = min_max(problem, "bops")
    assert_matches_brute_force(problem, None, float(np.random.default_rng(seed).uniform(lo, hi)))


@pytest.mark.parametrize("seed", range(8))
def test_ties_match_brute_force(seed: int) -> None:
    """Integer sensitivities create many exact ties (exercises the duplicate/dominance tie-break)."""
    problem = random_problem(600 + seed, nan_frac=0.0)
    problem.sensitivity = np.random.default_rng(seed).integers(0, 3, size=problem.sensitivity.shape).astype(float)
    s_lo, s_hi = min_max(problem, "size")
    b_lo, b_hi = min_max(problem, "bops")
    assert_matches_brute_force(problem, (s_lo + s_hi) / 2, None)
    assert_matches_brute_force(problem, (s_lo + s_hi) / 2, (b_lo + b_hi) / 2)


@pytest.mark.parametrize("seed", range(3))
def test_presolve_reductions_keep_the_optimum(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Larger instances (no brute force): the dominance and reduced-cost reductions must not change the optimum."""
    rng = np.random.default_rng(700 + seed)
    options = [BitOption(w, a) for w in (2, 3, 4, 8) for a in (2, 4, 6, 8)]
    wb = np.array([o.weight_bits for o in options], dtype=float)
    ab = np.array([o.activation_bits for o in options], dtype=float)
    num_layers = 60
    sens = rng.lognormal(0, 1, (num_layers, 1)) * 4.0 ** (2 - wb) + rng.lognormal(-1, 1, (num_layers, 1)) * 4.0 ** (
        2 - ab
    )
    problem = AllocationProblem(
        layer_names=[f"l{i}" for i in range(num_layers)],
        options=options,
        sensitivity=sens * rng.lognormal(0, 0.1, sens.shape),
        num_params=rng.integers(1_000, 1_000_000, num_layers),
        macs=rng.integers(100_000, 100_000_000, num_layers).astype(float),
    )
    kwargs = {"size_budget": 0.1, "bops_budget": 0.015}
    reduced = solve_allocation(problem, **kwargs)
    monkeypatch.setattr(solver, "reduced_cost_fixing", lambda cost, allowed, scaled: allowed)
    monkeypatch.setattr(solver, "drop_dominated", lambda criteria, allowed: allowed)
    plain = solve_allocation(problem, **kwargs)
    assert reduced.optimal and plain.optimal
    assert reduced.predicted_criterion == pytest.approx(plain.predicted_criterion, rel=1e-7)


@pytest.mark.parametrize("seed", range(2))
def test_presolve_off_gives_the_same_optimum(seed: int) -> None:
    """``presolve=False`` (what bench_ilp.py --compare-presolve measures) solves the same problem to the same optimum,
    and the infeasibility messages do not depend on it."""
    problem = random_problem(40 + seed, num_layers=8, pin=True)
    (s_lo, s_hi), (b_lo, b_hi) = min_max(problem, "size"), min_max(problem, "bops")
    size_bits, bops_abs = math.floor((s_lo + s_hi) / 2), (b_lo + b_hi) / 2
    kwargs = {"size_budget": size_bits, "size_budget_unit": "bits", "bops_budget": bops_abs,
              "bops_budget_unit": "absolute"}
    with_presolve = solve_allocation(problem, **kwargs)
    without = solve_allocation(problem, presolve=False, **kwargs)
    assert with_presolve.optimal and without.optimal
    expected = brute_force(problem, size_bits, bops_abs)
    assert expected is not None
    assert math.isclose(with_presolve.predicted_criterion, expected, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(without.predicted_criterion, expected, rel_tol=1e-9, abs_tol=1e-12)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible"):
        solve_allocation(problem, presolve=False, size_budget=s_lo - 1, size_budget_unit="bits")


def test_positive_mip_rel_gap_is_not_reported_optimal() -> None:
    problem = random_problem(13)
    alloc = solve_allocation(problem, size_budget=0.2, mip_rel_gap=1e-3)
    assert not alloc.optimal
    exact = solve_allocation(problem, size_budget=0.2)
    assert alloc.predicted_criterion <= exact.predicted_criterion + 1e-3 * abs(exact.predicted_criterion) + 1e-9
    with pytest.raises(ValueError, match="mip_rel_gap"):
        solve_allocation(problem, size_budget=0.2, mip_rel_gap=-1.0)


def test_budget_exactly_at_uniform_size_is_feasible() -> None:
    problem = random_problem(7, nan_frac=0.0)
    alloc = solve_allocation(problem, size_budget=4 / 32)
    assert alloc.size_fraction <= 4 / 32
    # The exact all-4-bit size must be reachable: the optimum is at least as good as uniform W4A4 / W4A8.
    for opt in (BitOption(4, 4), BitOption(4, 8)):
        assert alloc.predicted_criterion <= uniform_allocation(problem, opt).predicted_criterion + 1e-12


def test_deterministic() -> None:
    problem = random_problem(3, num_layers=8)
    a = solve_allocation(problem, size_budget=0.15, bops_budget=0.03)
    b = solve_allocation(problem, size_budget=0.15, bops_budget=0.03)
    assert a.assignment == b.assignment


# ------------------------------------------------------------------------------------------------------------
# Infeasibility
# ------------------------------------------------------------------------------------------------------------


def _two_layer_problem(**kwargs: object) -> AllocationProblem:
    options = [BitOption(2, 8), BitOption(4, 8), BitOption(8, 8)]
    sens = np.array([[np.nan, 0.5, 0.1], [3.0, 1.0, 0.0]])  # layer a may not take 2 bits
    return AllocationProblem(
        layer_names=["a", "b"],
        options=options,
        sensitivity=sens,
        num_params=np.array([100, 200]),
        macs=np.array([1000.0, 3000.0]),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("unit", "budget", "expected", "text"),
    [
        ("bits", 700, 800, "800 bits"),  # 100*4 (2 bits not allowed) + 200*2
        ("bytes", 50, 100, "100 bytes"),
        ("fraction", 0.05, 800 / 9600, f"{800 / 9600!r} fraction"),
    ],
)
def test_infeasible_size_reports_min(unit: str, budget: float, expected: float, text: str) -> None:
    problem = _two_layer_problem()
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_allocation(problem, size_budget=budget, size_budget_unit=unit)
    assert text in str(info.value)
    assert info.value.min_size_budget == pytest.approx(expected, rel=1e-15)
    # The stated minimum is itself feasible (copy-paste round trip).
    alloc = solve_allocation(problem, size_budget=info.value.min_size_budget, size_budget_unit=unit)
    assert alloc.weight_bits_total == 800


def test_infeasible_respects_pins() -> None:
    problem = _two_layer_problem(pinned={"b": BitOption(8, 8)})
    with pytest.raises(InfeasibleBudgetError, match=r"smallest feasible is 2000 bits"):  # 100*4 + 200*8
        solve_allocation(problem, size_budget=1999, size_budget_unit="bits")
    assert solve_allocation(problem, size_budget=2000, size_budget_unit="bits").weight_bits_total == 2000


def test_infeasible_bops_reports_min() -> None:
    problem = _two_layer_problem()
    min_bops = 1000 * 4 * 8 + 3000 * 2 * 8
    with pytest.raises(InfeasibleBudgetError, match=rf"smallest feasible is {min_bops} absolute"):
        solve_allocation(problem, bops_budget=min_bops - 1, bops_budget_unit="absolute")
    frac = min_bops / (4000 * 32 * 32)
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_allocation(problem, bops_budget=frac * 0.9)
    assert f"{frac!r} fraction" in str(info.value)


def test_combined_budgets_infeasible_together_states_both() -> None:
    # Option 0: small weights, many BOPs; option 1: big weights, few BOPs.
    problem = AllocationProblem(
        layer_names=["only"],
        options=[BitOption(2, 8), BitOption(8, 1)],
        sensitivity=np.array([[1.0, 2.0]]),
        num_params=np.array([10]),
        macs=np.array([100.0]),
    )
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_allocation(problem, size_budget=20, size_budget_unit="bits", bops_budget=800, bops_budget_unit="absolute")
    msg = str(info.value)
    assert "20 bits" in msg and "800 absolute" in msg  # each alone: min size 20 bits, min BOPs 800
    assert info.value.min_size_budget == 20 and info.value.min_bops_budget == 800
    assert "size budget of 80 bits" in msg and "BOPs budget of 1600 absolute" in msg


def test_combined_one_budget_short_states_both_minima() -> None:
    problem = _two_layer_problem()
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_allocation(problem, size_budget=100, size_budget_unit="bytes", bops_budget=1e-6)
    assert "100 bytes" in str(info.value)
    assert info.value.min_size_budget == 100
    assert info.value.min_bops_budget == pytest.approx((1000 * 32 + 3000 * 16) / (4000 * 1024))


# ------------------------------------------------------------------------------------------------------------
# Pins, nan options, units
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pinned_layers_honoured(seed: int) -> None:
    problem = random_problem(300 + seed, num_layers=6, nan_frac=0.0)
    # Pin the two layers to the option they would least like.
    worst = {name: OPTIONS[int(np.nanargmax(problem.sensitivity[l]))] for l, name in enumerate(problem.layer_names)}
    problem.pinned = {"layer1": worst["layer1"], "layer4": worst["layer4"]}
    lo, hi = min_max(problem, "size")
    alloc = solve_allocation(problem, size_budget=(lo + hi) / 2, size_budget_unit="bits")
    assert alloc.assignment["layer1"] == worst["layer1"]
    assert alloc.assignment["layer4"] == worst["layer4"]
    assert_matches_brute_force(problem, (lo + hi) / 2, None)


def test_pinned_option_with_nan_sensitivity_counts_as_zero() -> None:
    problem = _two_layer_problem(pinned={"a": BitOption(2, 8)})  # a's 2-bit sensitivity is nan
    alloc = solve_allocation(problem, size_budget=1.0)
    assert alloc.assignment["a"] == BitOption(2, 8)
    assert math.isfinite(alloc.predicted_criterion)
    assert alloc.predicted_criterion == pytest.approx(0.0)  # b at 8 bits costs 0


@pytest.mark.parametrize("seed", range(5))
def test_nan_options_never_chosen(seed: int) -> None:
    rng = np.random.default_rng(seed)
    problem = random_problem(400 + seed, num_layers=6, nan_frac=0.0)
    # Make the low-bit options the most attractive but disallowed on half the layers.
    problem.sensitivity[:, 0] = -1e3
    banned = rng.choice(6, size=3, replace=False)
    problem.sensitivity[banned, 0] = np.nan
    alloc = solve_allocation(problem, size_budget=1.0)
    for l in banned:
        assert alloc.assignment[f"layer{l}"] != OPTIONS[0]
    for l in set(range(6)) - set(banned.tolist()):
        assert alloc.assignment[f"layer{l}"] == OPTIONS[0]


@pytest.mark.parametrize("seed", range(5))
def test_units_agree(seed: int) -> None:
    problem = random_problem(500 + seed, num_layers=6)
    total = int(problem.num_params.sum())
    lo, hi = min_max(problem, "size")
    frac = float(np.random.default_rng(seed).uniform(lo, hi)) / (32 * total)
    by_fraction = solve_allocation(problem, size_budget=frac)
    by_bits = solve_allocation(problem, size_budget=frac * 32 * total, size_budget_unit="bits")
    by_bytes = solve_allocation(problem, size_budget=frac * 4 * total, size_budget_unit="bytes")
    assert by_fraction.assignment == by_bits.assignment == by_bytes.assignment
    b_lo, b_hi = min_max(problem, "bops")
    bops_abs = (b_lo + b_hi) / 2
    a = solve_allocation(problem, bops_budget=bops_abs, bops_budget_unit="absolute")
    b = solve_allocation(problem, bops_budget=bops_abs / problem.fp32_bops, bops_budget_unit="fraction")
    assert a.assignment == b.assignment
    alloc = by_fraction
    assert size_of(problem, alloc.assignment, "fraction") == pytest.approx(alloc.size_fraction)
    assert size_of(problem, alloc.assignment, "bytes") == pytest.approx(alloc.weight_bits_total / 8)
    assert alloc.size_fraction == pytest.approx(alloc.weight_bits_total / (32 * total))


def test_uniform_allocation() -> None:
    problem = random_problem(9, nan_frac=0.0)
    alloc = uniform_allocation(problem, BitOption(4, 8))
    assert set(alloc.assignment.values()) == {BitOption(4, 8)}
    assert alloc.size_fraction == pytest.approx(4 / 32)
    assert alloc.bops == pytest.approx(problem.macs.sum() * 32)
    assert alloc.predicted_criterion == pytest.approx(problem.sensitivity[:, 2].sum())
    problem.pinned = {"layer0": BitOption(8, 8)}
    pinned = uniform_allocation(problem, BitOption(2, 4))
    assert pinned.assignment["layer0"] == BitOption(8, 8)
    assert pinned.assignment["layer1"] == BitOption(2, 4)
    problem.sensitivity[3, 0] = np.nan
    with pytest.raises(ValueError, match="layer3"):
        uniform_allocation(problem, BitOption(2, 4))
    with pytest.raises(ValueError, match="not one of the options"):
        uniform_allocation(problem, BitOption(3, 3))


# ------------------------------------------------------------------------------------------------------------
# Validation and serialisation
# ------------------------------------------------------------------------------------------------------------


def _kwargs() -> dict[str, object]:
    return {
        "layer_names": ["a", "b"],
        "options": [BitOption(4, 8), BitOption(8, 8)],
        "sensitivity": np.array([[1.0, 0.0], [2.0, 0.0]]),
        "num_params": np.array([10, 20]),
        "macs": np.array([100.0, 200.0]),
    }


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"sensitivity": np.zeros((2, 3))}, "shape"),
        ({"num_params": np.array([1, 2, 3])}, "num_params"),
        ({"macs": np.array([1.0, -1.0])}, "'b'"),
        ({"sensitivity": np.array([[1.0, np.inf], [0.0, 0.0]])}, "'a'.*infinite"),
        ({"sensitivity": np.array([[1.0, 1.0], [np.nan, np.nan]])}, "'b' has no allowed option"),
        ({"pinned": {"zzz": BitOption(8, 8)}}, "'zzz'"),
        ({"pinned": {"b": BitOption(3, 8)}}, "'b' is pinned"),
        ({"layer_names": ["a", "a"]}, "duplicate"),
        ({"options": [BitOption(8, 8), BitOption(8, 8)]}, "duplicate"),
        ({"num_params": np.array([1.5, 2.0])}, "integer"),
    ],
)
def test_validation_errors(override: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        AllocationProblem(**{**_kwargs(), **override})  # type: ignore[arg-type]


def test_negative_sensitivities_allowed() -> None:
    kwargs = {**_kwargs(), "sensitivity": np.array([[-1.0, 0.0], [-0.5, 0.0]])}
    problem = AllocationProblem(**kwargs)  # type: ignore[arg-type]
    alloc = solve_allocation(problem, size_budget=1.0)
    assert alloc.predicted_criterion == pytest.approx(-1.5)


def test_solve_argument_errors() -> None:
    problem = AllocationProblem(**_kwargs())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        solve_allocation(problem)
    with pytest.raises(ValueError, match="unit"):
        solve_allocation(problem, size_budget=1.0, size_budget_unit="MB")
    with pytest.raises(ValueError, match="unit"):
        solve_allocation(problem, bops_budget=1.0, bops_budget_unit="bits")
    with pytest.raises(ValueError, match="finite"):
        solve_allocation(problem, size_budget=float("nan"))
    problem.pinned = {"nope": BitOption(8, 8)}  # mutation after construction is re-validated
    with pytest.raises(ValueError, match="'nope'"):
        solve_allocation(problem, size_budget=1.0)


def test_dict_round_trip() -> None:
    problem = random_problem(11, pin=True, nan_frac=0.3)
    assert np.isnan(problem.sensitivity).any()
    text = json.dumps(problem.to_dict(), allow_nan=False)
    restored = AllocationProblem.from_dict(json.loads(text))
    assert restored.layer_names == problem.layer_names
    assert restored.options == problem.options
    assert restored.pinned == problem.pinned
    np.testing.assert_array_equal(restored.sensitivity, problem.sensitivity)
    np.testing.assert_array_equal(restored.num_params, problem.num_params)
    np.testing.assert_array_equal(restored.macs, problem.macs)
    a = solve_allocation(problem, size_budget=0.2)
    b = solve_allocation(restored, size_budget=0.2)
    assert a.assignment == b.assignment
    json.dumps(a.to_dict(), allow_nan=False)


def test_time_limit_still_optimal_on_small_problem() -> None:
    alloc = solve_allocation(random_problem(12), size_budget=0.2, time_limit=10.0)
    assert alloc.optimal and alloc.mip_gap is not None and alloc.mip_gap <= 1e-9
