"""Unit tests of service.calibration.uf: the UF Calibration math (spec steps 1-5)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.calibration import uf

A, B, C, D, E = range(5)

# The spec's worked example: M = 5, P = {D: 0.6, A: 0.3, C: 0.1}.
WORKED_P = [0.3, 0.0, 0.1, 0.6, 0.0]
FIG3_CHAINS = {D: [D, A, C], A: [A, D, C], C: [C, A, D]}
LOYAL_CHAINS = {D: [D], A: [A, D], C: [C, D]}

PROPS = settings(max_examples=100, deadline=None)


# ---------------------------------------------------------------- worked example (spec)


def test_worked_example_fig3_chains() -> None:
    u = uf.uncertainty(WORKED_P)
    f = uf.fidelity(WORKED_P, FIG3_CHAINS, tau=2.0)
    conf = uf.confidence(u, f[D])
    assert round(u, 5) == 0.55793
    assert round(f[D], 5) == 0.44286
    assert f[D] == pytest.approx(0.6 * 8 / 14 + 0.3 * 4 / 14 + 0.1 * 2 / 14, abs=1e-12)
    assert round(conf, 5) == 0.19578
    assert conf == pytest.approx((1 - u) * f[D], abs=1e-12)
    # the answer is argmax P
    assert uf.answer_index(WORKED_P) == D
    # the other options, by hand
    assert f[A] == pytest.approx(0.6 * 4 / 14 + 0.3 * 8 / 14 + 0.1 * 4 / 14, abs=1e-12)
    assert f[C] == pytest.approx(0.6 * 2 / 14 + 0.3 * 2 / 14 + 0.1 * 8 / 14, abs=1e-12)
    assert f[B] == 0.0
    assert f[E] == 0.0
    assert sum(f) == pytest.approx(1.0, abs=1e-12)


def test_worked_example_loyal_chains() -> None:
    u = uf.uncertainty(WORKED_P)
    f = uf.fidelity(WORKED_P, LOYAL_CHAINS, tau=2.0)
    assert round(f[D], 5) == 0.73333
    assert f[D] == pytest.approx(0.6 + 0.3 / 3 + 0.1 / 3, abs=1e-12)
    assert round(uf.confidence(u, f[D]), 5) == 0.32419
    assert f[A] == pytest.approx(0.3 * 2 / 3, abs=1e-12)
    assert f[C] == pytest.approx(0.1 * 2 / 3, abs=1e-12)


def test_uncertainty_worked_example_by_formula() -> None:
    expected = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1)) / math.log(5)
    assert uf.uncertainty(WORKED_P) == pytest.approx(expected, abs=1e-15)


# ---------------------------------------------------------------- chain fidelity


def test_chain_fidelity_by_hand_tau2() -> None:
    assert uf.chain_fidelity([3, 0, 2], tau=2.0) == pytest.approx({3: 4 / 7, 0: 2 / 7, 2: 1 / 7})


def test_chain_fidelity_default_tau_is_two() -> None:
    assert uf.DEFAULT_TAU == 2.0
    assert uf.chain_fidelity([1, 0]) == pytest.approx({1: 2 / 3, 0: 1 / 3})


def test_chain_of_one_gives_fidelity_one() -> None:
    assert uf.chain_fidelity([4]) == {4: 1.0}
    assert uf.chain_fidelity([4], tau=5.0) == {4: 1.0}


def test_tau_one_is_uniform() -> None:
    assert uf.chain_fidelity([2, 0, 1, 3], tau=1.0) == pytest.approx(
        {2: 0.25, 0: 0.25, 1: 0.25, 3: 0.25}
    )


def test_chain_fidelity_other_tau() -> None:
    # tau = 3, n = 3: 27, 9, 3 over 39
    assert uf.chain_fidelity([0, 1, 2], tau=3.0) == pytest.approx(
        {0: 27 / 39, 1: 9 / 39, 2: 3 / 39}
    )


def test_chain_fidelity_errors() -> None:
    with pytest.raises(ValueError):
        uf.chain_fidelity([])
    with pytest.raises(ValueError):
        uf.chain_fidelity([0, 1], tau=0.0)
    with pytest.raises(ValueError):
        uf.chain_fidelity([0, 1], tau=-2.0)


def test_fidelity_errors() -> None:
    with pytest.raises(ValueError):  # chain does not begin with its start
        uf.fidelity([0.5, 0.5], {0: [1, 0]})
    with pytest.raises(ValueError):  # empty chain
        uf.fidelity([0.5, 0.5], {0: []})
    with pytest.raises(ValueError):  # starts carry no probability
        uf.fidelity([1.0, 0.0], {1: [1]})


def test_fidelity_weights_are_renormalised_over_the_start_set() -> None:
    # Only D and A start chains: weights 0.6/0.9 and 0.3/0.9.
    f = uf.fidelity(WORKED_P, {D: [D], A: [A]})
    assert f[D] == pytest.approx(2 / 3)
    assert f[A] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- uncertainty & confidence


@pytest.mark.parametrize("m", [2, 3, 5, 26])
def test_uncertainty_uniform_is_one(m: int) -> None:
    assert uf.uncertainty([1 / m] * m) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("m", [2, 4, 26])
def test_uncertainty_one_hot_is_zero(m: int) -> None:
    p = [0.0] * m
    p[m - 1] = 1.0
    assert uf.uncertainty(p) == 0.0


def test_uncertainty_zero_ln_zero() -> None:
    # zeros contribute nothing: [0.5, 0.5, 0, 0] has entropy ln 2 over ln 4
    assert uf.uncertainty([0.5, 0.5, 0.0, 0.0]) == pytest.approx(0.5, abs=1e-12)


def test_uncertainty_needs_two_options() -> None:
    with pytest.raises(ValueError):
        uf.uncertainty([1.0])


def test_confidence_and_fidelity_ablation() -> None:
    assert uf.confidence(0.25, 0.8) == pytest.approx(0.6)
    assert uf.confidence(0.25, 0.8, use_uncertainty=False) == pytest.approx(0.8)
    assert uf.confidence(1.0, 1.0) == 0.0
    assert uf.confidence(0.0, 1.0) == 1.0


# ---------------------------------------------------------------- step 1: the distribution


def test_distribution_from_samples_fig3() -> None:
    # sampled D, D, D, A, A, C
    p = uf.distribution_from_samples([D, D, D, A, A, C], 5)
    assert p == pytest.approx([2 / 6, 0, 1 / 6, 3 / 6, 0])


def test_distribution_from_samples_drops_none() -> None:
    p = uf.distribution_from_samples([None, 1, None, 1, 0, None], 3)
    assert p == pytest.approx([1 / 3, 2 / 3, 0.0])


def test_distribution_from_samples_all_none_raises() -> None:
    with pytest.raises(ValueError):
        uf.distribution_from_samples([None, None, None], 4)
    with pytest.raises(ValueError):
        uf.distribution_from_samples([], 4)


def test_distribution_from_logprobs_softmax() -> None:
    p = uf.distribution_from_logprobs([math.log(0.6), math.log(0.3), math.log(0.1)])
    assert p == pytest.approx([0.6, 0.3, 0.1], abs=1e-12)
    # unnormalised letter log-probs (mass outside the letters) are renormalised
    p = uf.distribution_from_logprobs([math.log(0.06), math.log(0.02)])
    assert p == pytest.approx([0.75, 0.25], abs=1e-12)


def test_distribution_from_logprobs_temperature() -> None:
    # T = 2: weights sqrt(0.8), sqrt(0.2) = 2:1
    p = uf.distribution_from_logprobs([math.log(0.8), math.log(0.2)], temperature=2.0)
    assert p == pytest.approx([2 / 3, 1 / 3], abs=1e-12)
    # T = 0.5: squares 0.64 : 0.04
    p = uf.distribution_from_logprobs([math.log(0.8), math.log(0.2)], temperature=0.5)
    assert p == pytest.approx([0.64 / 0.68, 0.04 / 0.68], abs=1e-12)


def test_distribution_from_logprobs_minus_inf_gives_zero() -> None:
    p = uf.distribution_from_logprobs([-math.inf, 0.0, -math.inf, math.log(1 / 3)])
    assert p == pytest.approx([0.0, 0.75, 0.0, 0.25], abs=1e-12)
    assert p[0] == 0.0
    assert p[2] == 0.0


def test_distribution_from_logprobs_errors() -> None:
    with pytest.raises(ValueError):
        uf.distribution_from_logprobs([-math.inf, -math.inf])
    with pytest.raises(ValueError):
        uf.distribution_from_logprobs([0.0, -1.0], temperature=0.0)


def test_distribution_from_logprobs_large_values_stable() -> None:
    p = uf.distribution_from_logprobs([1000.0, 1000.0 - math.log(3)])
    assert p == pytest.approx([0.75, 0.25], abs=1e-12)


def test_answer_index_ties_go_to_earliest() -> None:
    assert uf.answer_index([0.2, 0.4, 0.4]) == 1
    assert uf.answer_index([0.25, 0.25, 0.25, 0.25]) == 0
    assert uf.answer_index([0.1, 0.2, 0.7]) == 2
    assert uf.answer_index(WORKED_P) == D


# ---------------------------------------------------------------- start sets


def test_start_set_eps_zero_vs_default() -> None:
    p = [0.5, 0.495, 0.005, 0.0]
    assert uf.start_set(p) == [0, 1, 2]
    assert uf.start_set(p, 0.0) == [0, 1, 2]
    assert uf.start_set(p, 0.01) == [0, 1]
    assert uf.DEFAULT_EPS == 0.01


def test_start_set_eps_is_inclusive() -> None:
    assert uf.start_set([0.98, 0.01, 0.01], 0.01) == [0, 1, 2]


def test_start_set_is_ordered_by_index() -> None:
    assert uf.start_set(WORKED_P) == [A, C, D]


def test_bounded_start_set_skip_mass_zero_keeps_all() -> None:
    starts = uf.start_set(WORKED_P)
    assert uf.bounded_start_set(WORKED_P, starts, 0.0) == starts


def test_bounded_start_set_by_hand() -> None:
    starts = [A, C, D]
    # 0.1 of 1.0 may go: C (0.1) is dropped, A (0.3) is not
    assert uf.bounded_start_set(WORKED_P, starts, 0.1) == [A, D]
    assert uf.bounded_start_set(WORKED_P, starts, 0.39) == [A, D]
    assert uf.bounded_start_set(WORKED_P, starts, 0.4) == [D]
    # the argmax stays even when the budget would cover it
    assert uf.bounded_start_set(WORKED_P, starts, 0.99) == [D]


def test_bounded_start_set_single_start() -> None:
    assert uf.bounded_start_set([1.0, 0.0], [0], 0.5) == [0]


# ---------------------------------------------------------------- ChainState


def _run(state: uf.ChainState, picks: list[int | None]) -> uf.ChainState:
    for pick in picks:
        assert not state.done
        state.advance(pick)
    return state


def test_chain_state_fig3() -> None:
    # Sampled D, D, D, A, A, C: start set {A, C, D}; the model's greedy picks per step.
    p = uf.distribution_from_samples([D, D, D, A, A, C], 5)
    starts = uf.start_set(p)
    assert starts == [A, C, D]
    script = {D: [A, C, D], A: [D, C, A], C: [A, D, C]}
    chains = {}
    for s in starts:
        state = _run(uf.ChainState(s, 5), list(script[s]))
        assert state.done
        assert not state.unparsed
        chains[s] = state.chain
    assert chains == {D: [D, A, C], A: [A, D, C], C: [C, A, D]}
    f = uf.fidelity(p, chains)
    assert f[D] == pytest.approx(3 / 6 * 4 / 7 + 2 / 6 * 2 / 7 + 1 / 6 * 1 / 7)


def test_chain_state_initial() -> None:
    state = uf.ChainState(3, 5)
    assert state.chain == [3]
    assert state.removed == frozenset()
    assert state.allowed() == [0, 1, 2, 3, 4]
    assert not state.done


def test_chain_state_picking_start_stops() -> None:
    state = _run(uf.ChainState(1, 4), [1])
    assert state.done
    assert not state.unparsed
    assert state.chain == [1]


def test_chain_state_allowed_keeps_letters_of_remaining_options() -> None:
    state = _run(uf.ChainState(3, 5), [0])
    assert state.removed == frozenset({0})
    assert state.allowed() == [1, 2, 3, 4]
    state.advance(4)
    assert state.allowed() == [1, 2, 3]
    assert state.chain == [3, 0, 4]
    assert not state.done


def test_chain_state_removed_pick_ends_unparsed() -> None:
    state = _run(uf.ChainState(2, 5), [0, 0])
    assert state.done
    assert state.unparsed
    assert state.chain == [2, 0]


def test_chain_state_none_ends_unparsed() -> None:
    state = _run(uf.ChainState(2, 5), [1, None])
    assert state.done
    assert state.unparsed
    assert state.chain == [2, 1]


def test_chain_state_out_of_range_pick_ends_unparsed() -> None:
    state = _run(uf.ChainState(0, 3), [7])
    assert state.done
    assert state.unparsed
    assert state.chain == [0]


def test_chain_state_stops_when_only_start_is_left() -> None:
    state = _run(uf.ChainState(0, 3), [2, 1])
    assert state.done
    assert not state.unparsed
    assert state.chain == [0, 2, 1]
    assert state.allowed() == [0]


def test_chain_state_two_options() -> None:
    state = _run(uf.ChainState(1, 2), [0])
    assert state.done
    assert state.chain == [1, 0]


def test_chain_state_advance_after_done_raises() -> None:
    state = _run(uf.ChainState(0, 3), [0])
    with pytest.raises(ValueError):
        state.advance(1)


# ---------------------------------------------------------------- properties


@st.composite
def distributions(draw: st.DrawFn, min_m: int = 2, max_m: int = 26) -> list[float]:
    m = draw(st.integers(min_m, max_m))
    raw = draw(
        st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1.0)), min_size=m, max_size=m).filter(
            lambda xs: sum(xs) > 0
        )
    )
    total = sum(raw)
    return [x / total for x in raw]


def _draw_chains(draw: st.DrawFn, n_options: int, starts: list[int]) -> dict[int, list[int]]:
    chains = {}
    for s in starts:
        others = [i for i in range(n_options) if i != s]
        order = draw(st.permutations(others))
        length = draw(st.integers(0, len(others)))
        chains[s] = [s, *order[:length]]
    return chains


@st.composite
def scored_questions(draw: st.DrawFn) -> tuple[list[float], dict[int, list[int]], float]:
    p = draw(distributions())
    starts = uf.start_set(p, draw(st.sampled_from([0.0, 0.01])))
    if not starts:
        starts = [uf.answer_index(p)]
    chains = _draw_chains(draw, len(p), starts)
    tau = draw(st.sampled_from([1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]))
    return p, chains, tau


@PROPS
@given(scored_questions())
def test_confidence_bounded_by_one_minus_uncertainty(
    case: tuple[list[float], dict[int, list[int]], float],
) -> None:
    p, chains, tau = case
    u = uf.uncertainty(p)
    assert 0.0 <= u <= 1.0
    f = uf.fidelity(p, chains, tau)
    for a in range(len(p)):
        assert 0.0 <= f[a] <= 1.0 + 1e-12
        conf = uf.confidence(u, f[a])
        assert 0.0 <= conf <= 1.0 - u + 1e-12


@PROPS
@given(scored_questions())
def test_fidelity_sums_to_one(case: tuple[list[float], dict[int, list[int]], float]) -> None:
    p, chains, tau = case
    assert sum(uf.fidelity(p, chains, tau)) == pytest.approx(1.0, abs=1e-9)


@PROPS
@given(scored_questions(), st.data())
def test_permuting_options_permutes_the_result(
    case: tuple[list[float], dict[int, list[int]], float], data: st.DataObject
) -> None:
    p, chains, tau = case
    m = len(p)
    perm = data.draw(st.permutations(range(m)))  # old index i -> new index perm[i]
    q = [0.0] * m
    for i, pi in enumerate(p):
        q[perm[i]] = pi
    q_chains = {perm[s]: [perm[x] for x in c] for s, c in chains.items()}

    assert uf.uncertainty(q) == pytest.approx(uf.uncertainty(p), abs=1e-12)
    f = uf.fidelity(p, chains, tau)
    g = uf.fidelity(q, q_chains, tau)
    for i in range(m):
        assert g[perm[i]] == pytest.approx(f[i], abs=1e-12)
    u = uf.uncertainty(p)
    for a in range(m):
        assert uf.confidence(uf.uncertainty(q), g[perm[a]]) == pytest.approx(
            uf.confidence(u, f[a]), abs=1e-12
        )
    assert sorted(uf.start_set(q)) == sorted(perm[s] for s in uf.start_set(p))


@PROPS
@given(distributions(), st.floats(0.0, 0.99), st.data())
def test_bounded_start_set_properties(
    p: list[float], skip_mass: float, data: st.DataObject
) -> None:
    starts = uf.start_set(p)
    kept = uf.bounded_start_set(p, starts, skip_mass)
    answer = uf.answer_index(p)
    dropped = [s for s in starts if s not in kept]

    assert [s for s in starts if s in kept] == kept  # a sub-list, order kept
    assert answer in kept
    total = sum(p[s] for s in starts)
    dropped_mass = sum(p[s] for s in dropped)
    assert dropped_mass <= skip_mass * total + 1e-12
    # the least likely go first
    for d in dropped:
        for k in kept:
            assert p[d] <= p[k]
    if skip_mass == 0.0:
        assert kept == starts

    # dropping chains moves F(answer) by at most the dropped share (F is a convex mix)
    chains = _draw_chains(data.draw, len(p), starts)
    tau = data.draw(st.sampled_from([1.0, 2.0, 3.0]))
    f_all = uf.fidelity(p, chains, tau)
    f_kept = uf.fidelity(p, {s: chains[s] for s in kept}, tau)
    share = dropped_mass / total
    assert abs(f_all[answer] - f_kept[answer]) <= share + 1e-9
    assert abs(f_all[answer] - f_kept[answer]) <= skip_mass + 1e-9
    u = uf.uncertainty(p)
    assert abs(uf.confidence(u, f_all[answer]) - uf.confidence(u, f_kept[answer])) <= (share + 1e-9)
