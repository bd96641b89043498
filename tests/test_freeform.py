"""Unit tests of service.calibration.freeform: normalisation, cleaning, grouping, anchors."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.calibration import freeform as ff
from service.calibration.freeform import Group


def _run_rounds(
    groups: list[Group], same: Callable[[str, str], bool], limit: int | None = None
) -> tuple[list[Group], int, int]:
    """Drive the judge rounds with a plain function (what scoring_freeform does with an
    engine): the final groups, the pairs asked and the rounds run."""
    asked = rounds = 0
    head = 0
    while head < len(groups) - 1:
        pairs = ff.judge_requests(groups, head)
        if limit is not None:
            pairs = pairs[: max(0, limit - asked)]
        if pairs:
            rounds += 1
        asked += len(pairs)
        groups = ff.merge_groups(groups, pairs, [same(p.first, p.second) for p in pairs])
        head += 1
    return ff.order_groups(groups), asked, rounds


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an  Apple, a day! ", "apple day"),
        ("Paris.", "paris"),
        ("THE", ""),
        ("theatre", "theatre"),  # only whole words are articles
        ("U.S.A.", "usa"),
        ("3.14", "314"),  # SQuAD removes every punctuation mark
    ],
)
def test_normalize_answer_is_squads(text: str, expected: str) -> None:
    assert ff.normalize_answer(text) == expected


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_answer_is_idempotent(text: str) -> None:
    once = ff.normalize_answer(text)
    assert ff.normalize_answer(once) == once


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (" Paris.", "Paris"),
        (" Paris. It is the capital of France.", "Paris"),
        (" Paris\nQuestion: what is", "Paris"),
        ("\n\n **Paris**\n", "Paris"),
        (' "blue whale"', "blue whale"),
        (" The answer is 42.", "42"),
        (": 3.14", "3.14"),
        (" -7.", "-7"),
        (" the answer is: so the answer is 5", "5"),
        ("", ""),
        ("   \n  ", ""),
        (" ...", ""),
        (" the", ""),
    ],
)
def test_clean_sample(sample: str, expected: str) -> None:
    assert ff.clean_sample(sample) == expected


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_clean_sample_is_usable_or_empty(text: str) -> None:
    cleaned = ff.clean_sample(text)
    assert cleaned == "" or ff.normalize_answer(cleaned) != ""
    assert "\n" not in cleaned


# ---------------------------------------------------------------- exact tier


def test_exact_groups_worked_example() -> None:
    answers = ["paris", "London", "Paris", "", "Paris.", "London", "Rome"]
    groups = ff.exact_groups(answers)
    assert [g.representative for g in groups] == ["paris", "London", "Rome"]
    assert groups[0].members == ("paris", "Paris", "Paris.")
    assert groups[0].indices == (0, 2, 4)
    assert [g.count for g in groups] == [3, 2, 1]
    assert not any(g.given for g in groups)


def test_representative_is_the_most_frequent_form() -> None:
    groups = ff.exact_groups(["paris", "Paris", "Paris", "the Paris"])
    assert groups[0].representative == "Paris"
    assert groups[0].members == ("paris", "Paris", "the Paris")


def test_ties_go_to_first_appearance() -> None:
    groups = ff.exact_groups(["y", "x", "x", "y", "z"])
    assert [g.representative for g in groups] == ["y", "x", "z"]


answer_lists = st.lists(st.sampled_from(["Paris", "paris", "the Paris", "Rome", "rome.", ""]))


@settings(max_examples=200, deadline=None)
@given(answer_lists)
def test_exact_groups_partition_the_usable_samples(answers: list[str]) -> None:
    groups = ff.exact_groups(answers)
    indices = [i for g in groups for i in g.indices]
    usable = [i for i, a in enumerate(answers) if ff.normalize_answer(a)]
    assert sorted(indices) == usable  # each usable sample in exactly one group
    for g in groups:
        assert len({ff.normalize_answer(answers[i]) for i in g.indices}) == 1
    keys = [(-g.count, g.first) for g in groups]
    assert keys == sorted(keys)


# ---------------------------------------------------------------- judge tier


def _synonyms(*sets: set[str]) -> Callable[[str, str], bool]:
    def same(a: str, b: str) -> bool:
        a, b = ff.normalize_answer(a), ff.normalize_answer(b)
        return a == b or any(a in s and b in s for s in sets)

    return same


def test_judge_round_pairs_compare_with_the_head_only() -> None:
    groups = ff.exact_groups(["Paris", "Paris", "Rome", "City of Light", "Lutetia"])
    pairs = ff.judge_requests(groups, 0)
    assert [(p.first, p.second) for p in pairs] == [
        ("Paris", "Rome"),
        ("Paris", "City of Light"),
        ("Paris", "Lutetia"),
    ]
    assert ff.judge_requests(groups, 3) == []
    assert ff.judge_requests(groups, 9) == []


def test_merge_groups_worked_example() -> None:
    groups = ff.exact_groups(["Paris", "Paris", "Rome", "City of Light", "Lutetia"])
    same = _synonyms({"paris", "city of light", "lutetia"})
    final, asked, rounds = _run_rounds(groups, same)
    assert [(g.representative, g.count) for g in final] == [("Paris", 4), ("Rome", 1)]
    assert final[0].members == ("Paris", "City of Light", "Lutetia")
    assert final[0].indices == (0, 1, 3, 4)
    # Round 0 settles Paris against the 3 others; round 1 is Rome alone (no pair).
    assert (asked, rounds) == (3, 1)


def test_a_pair_with_no_verdict_stays_apart() -> None:
    groups = ff.exact_groups(["x", "y", "z"])
    pairs = ff.judge_requests(groups, 0)
    merged = ff.merge_groups(groups, pairs, [True])  # the second pair was cut
    assert [g.members for g in merged] == [("x", "y"), ("z",)]


def test_a_non_transitive_judge_cannot_chain_groups() -> None:
    # x~y and y~z but not x~z: y joins x (the head); z stays apart.
    pairs_said_same = {frozenset({"x", "y"}), frozenset({"y", "z"})}
    groups = ff.exact_groups(["x", "x", "y", "z"])
    final, _, _ = _run_rounds(groups, lambda p, q: frozenset({p, q}) in pairs_said_same)
    assert [g.members for g in final] == [("x", "y"), ("z",)]


def test_all_different_costs_every_pair_in_rounds() -> None:
    groups = ff.exact_groups(list("vwxyz"))
    _, asked, rounds = _run_rounds(groups, lambda a, b: False)
    assert (rounds, asked) == ff.judge_rounds_bound(5) == (4, 10)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 6), max_size=20),
    st.integers(1, 4),
)
def test_judge_rounds_keep_a_partition(values: list[int], modulus: int) -> None:
    answers = [str(v) for v in values]
    groups = ff.exact_groups(answers)
    final, asked, _ = _run_rounds(groups, lambda a, b: int(a) % modulus == int(b) % modulus)
    assert sorted(i for g in final for i in g.indices) == list(range(len(answers)))
    assert asked <= ff.judge_rounds_bound(len(groups))[1]
    # With an equivalence relation, the rounds find exactly its classes.
    assert len(final) == len({v % modulus for v in values})
    keys = [(-g.count, g.first) for g in final]
    assert keys == sorted(keys)


def test_cap_groups_drops_and_counts_the_rest() -> None:
    answers = [f"a{i}" for i in range(30)] + ["a0"]
    groups = ff.exact_groups(answers)
    kept, dropped = ff.cap_groups(groups)
    assert len(kept) == 26 and dropped == 4
    assert kept[0].representative == "a0" and kept[0].count == 2


def test_cap_groups_keeps_the_given_answer() -> None:
    groups, exact = ff.add_candidate(ff.exact_groups([f"a{i}" for i in range(30)]), "zzz")
    assert not exact
    kept, dropped = ff.cap_groups(groups)
    assert len(kept) == 26 and kept[-1].given and dropped == 5


# ---------------------------------------------------------------- the given answer


def test_given_answer_exact_tier() -> None:
    groups = ff.exact_groups(["Paris", "Rome", "Paris"])
    marked, exact = ff.add_candidate(groups, "the paris")
    assert exact and ff.given_group(marked) == 0
    assert marked[0].count == 2  # the given answer counts no sample
    assert marked[0].members == ("Paris", "the paris")


def test_given_answer_judge_tier() -> None:
    groups, exact = ff.add_candidate(ff.exact_groups(["Paris", "Rome", "Paris"]), "City of Light")
    assert not exact and groups[-1].count == 0
    final, asked, _ = _run_rounds(groups, _synonyms({"paris", "city of light"}))
    assert ff.given_group(final) == 0 and final[0].count == 2
    assert asked == 2  # Paris~Rome, Paris~City of Light; Rome's round is cut by the merge


def test_given_answer_absent_is_an_option_of_its_own() -> None:
    groups, _ = ff.add_candidate(ff.exact_groups(["Paris", "Rome", "Paris"]), "Berlin")
    final, _, _ = _run_rounds(groups, lambda a, b: False)
    assert ff.groups_to_options(final) == ["Paris", "Rome", "Berlin"]
    assert ff.given_group(final) == 2 and final[2].count == 0


def test_given_answer_must_have_content() -> None:
    with pytest.raises(ValueError):
        ff.add_candidate([], " the ")


# ---------------------------------------------------------------- options and anchors


def test_groups_to_options_largest_first() -> None:
    groups = ff.exact_groups(["Rome", "Paris", "Paris"])
    assert ff.groups_to_options(groups) == ["Paris", "Rome"]


def test_single_group_gets_an_abstention() -> None:
    one = ff.exact_groups(["Paris", "paris"])
    assert ff.single_group_option(one) == ff.ABSTAIN_OPTION
    assert ff.single_group_option(ff.exact_groups(["I don't know"])) == ff.ABSTAIN_FALLBACK
    assert ff.single_group_option(ff.exact_groups(["x", "y"])) is None


def test_anchors_worked_example() -> None:
    groups = ff.exact_groups(["x"] * 6 + ["y"] * 3 + ["z"])
    assert ff.largest_group_share(groups, 10) == pytest.approx(0.6)
    expected = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    assert ff.semantic_entropy(groups) == pytest.approx(expected)  # 0.89794 nats
    assert ff.normalized_semantic_entropy(groups) == pytest.approx(expected / math.log(10))


def test_anchors_edge_cases() -> None:
    one = ff.exact_groups(["x", "x"])
    assert ff.semantic_entropy(one) == 0.0 and ff.normalized_semantic_entropy(one) == 0.0
    assert ff.largest_group_share(one, 2) == 1.0
    assert ff.semantic_entropy([]) == 0.0
    all_apart = ff.exact_groups(list("wxyz"))
    assert ff.normalized_semantic_entropy(all_apart) == pytest.approx(1.0)
    with_given, _ = ff.add_candidate(one, "y")  # a group of no sample does not count
    assert ff.semantic_entropy(with_given) == 0.0
    with pytest.raises(ValueError):
        ff.largest_group_share(one, 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30))
def test_anchor_ranges(values: Sequence[int]) -> None:
    groups = ff.exact_groups([str(v) for v in values])
    assert 0.0 <= ff.normalized_semantic_entropy(groups) <= 1.0
    assert 0.0 <= ff.semantic_entropy(groups) <= math.log(len(values)) + 1e-12
    assert 1 / len(values) <= ff.largest_group_share(groups, len(values)) <= 1.0


# ---------------------------------------------------------------- prompts


def test_prompts() -> None:
    template = ff.FreeformTemplate()
    p = ff.sample_prompt("What is the capital of France?", template)
    assert p.answer_prefix == "The answer is" and p.chat
    assert p.messages()[-1] == {"role": "assistant", "content": "The answer is"}
    j = ff.judge_prompt("What is the capital of France?", "Paris", "Rome", template)
    assert "Answer 1: Paris\nAnswer 2: Rome" in j.user
    assert j.user.startswith("Question: What is the capital of France?")
    assert j.prefix_key == p.prefix_key != ""


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("yes", True), (" Yes.", True), ("no", False), (" No", False), ("none", None), ("", None)],
)
def test_parse_yes_no(reply: str, expected: bool | None) -> None:
    assert ff.parse_yes_no(reply) is expected
