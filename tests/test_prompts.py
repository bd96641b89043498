"""Unit tests of service.calibration.prompts and service.engines.letters."""

from __future__ import annotations

import math

import pytest

from service.calibration.prompts import (
    LETTERS,
    MAX_OPTIONS,
    SUBSTITUTE_TEXT,
    Prompt,
    PromptTemplate,
    Question,
    ShownOption,
    all_options,
    chain_options,
    letter_forms,
    parse_answer,
    render,
)
from service.engines.base import EngineFeatureMissing
from service.engines.letters import (
    UnreadableLetter,
    choice_strings,
    combine_letter_logprobs,
    letter_token_ids,
)

INSTRUCTION = "Answer with the letter of the correct option only."
Q = Question(
    "Which gas do plants take from the air for photosynthesis?",
    ("Oxygen", "Carbon dioxide", "Nitrogen", "Helium"),
)
ABCD = ("A", "B", "C", "D")


# ---------------------------------------------------------------- Question


def test_question_labels() -> None:
    assert Q.labels == ABCD
    assert Question("q", ("x", "y")).labels == ("A", "B")
    assert Question("q", tuple(str(i) for i in range(26))).labels == tuple(LETTERS)
    assert MAX_OPTIONS == 26


@pytest.mark.parametrize("n", [0, 1, 27])
def test_question_rejects_bad_option_counts(n: int) -> None:
    with pytest.raises(ValueError):
        Question("q", tuple(f"o{i}" for i in range(n)))


# ---------------------------------------------------------------- render


def test_render_default_template_exact() -> None:
    prompt = render(Q, all_options(Q), PromptTemplate())
    assert prompt.user == (
        "Question: Which gas do plants take from the air for photosynthesis?\n"
        "Options:\n"
        "A. Oxygen\n"
        "B. Carbon dioxide\n"
        "C. Nitrogen\n"
        "D. Helium\n"
        f"{INSTRUCTION}"
    )
    assert prompt.answer_prefix == "Answer:"
    assert prompt.chat is True
    assert prompt.system_prompt is None


def test_render_question_first_then_options_then_instruction() -> None:
    user = render(Q, all_options(Q), PromptTemplate()).user
    lines = user.splitlines()
    assert lines[0].startswith("Question: ")
    assert lines[1] == "Options:"
    assert lines[2:6] == ["A. Oxygen", "B. Carbon dioxide", "C. Nitrogen", "D. Helium"]
    assert lines[-1] == INSTRUCTION


def test_render_strips_whitespace() -> None:
    q = Question("  Why?  ", ("  yes ", "no\n"))
    assert render(q, all_options(q), PromptTemplate(instruction="")).user == (
        "Question: Why?\nOptions:\nA. yes\nB. no"
    )


def test_render_without_instruction() -> None:
    user = render(Q, all_options(Q), PromptTemplate(instruction="")).user
    assert user.splitlines()[-1] == "D. Helium"


def test_render_few_shot_is_a_prefix() -> None:
    shots = "Question: 1+1?\nOptions:\nA. 2\nB. 3\nAnswer: A\n\n"
    prompt = render(Q, all_options(Q), PromptTemplate(few_shot=shots))
    assert prompt.user.startswith(shots + "Question: Which gas")
    assert prompt.user == shots + render(Q, all_options(Q), PromptTemplate()).user


def test_render_template_fields_carry_over() -> None:
    template = PromptTemplate(chat=False, system_prompt="Be brief.", answer_prefix="Ans:")
    prompt = render(Q, all_options(Q), template)
    assert prompt.chat is False
    assert prompt.system_prompt == "Be brief."
    assert prompt.answer_prefix == "Ans:"


def test_chain_variants_share_prefix_up_to_first_option_line() -> None:
    shots = "Question: 1+1?\nOptions:\nA. 2\nB. 3\nAnswer: A\n\n"
    template = PromptTemplate(few_shot=shots)
    variants = [render(Q, all_options(Q), template).user]
    for s in range(4):
        variants.append(render(Q, chain_options(Q, s), template).user)
        variants.append(render(Q, chain_options(Q, s, frozenset({(s + 1) % 4})), template).user)
    prefix = shots + f"Question: {Q.text}\nOptions:\n"
    for v in variants:
        assert v.startswith(prefix)
    # the option block is where they differ, right after the shared prefix
    assert len({v[len(prefix) :] for v in variants}) == len(variants)
    # and the instruction is the same last line everywhere
    assert {v.splitlines()[-1] for v in variants} == {INSTRUCTION}


# ---------------------------------------------------------------- chain options


def test_all_options() -> None:
    assert all_options(Q) == [
        ShownOption(0, "A", "Oxygen"),
        ShownOption(1, "B", "Carbon dioxide"),
        ShownOption(2, "C", "Nitrogen"),
        ShownOption(3, "D", "Helium"),
    ]


def test_chain_options_substitutes_and_keeps_letter() -> None:
    shown = chain_options(Q, 1)
    assert shown == [
        ShownOption(0, "A", "Oxygen"),
        ShownOption(1, "B", SUBSTITUTE_TEXT),
        ShownOption(2, "C", "Nitrogen"),
        ShownOption(3, "D", "Helium"),
    ]
    assert SUBSTITUTE_TEXT == "All other options are wrong."


def test_chain_options_removed_vanish_other_letters_stay() -> None:
    shown = chain_options(Q, 3, frozenset({0, 2}))
    assert shown == [ShownOption(1, "B", "Carbon dioxide"), ShownOption(3, "D", SUBSTITUTE_TEXT)]
    user = render(Q, shown, PromptTemplate()).user
    assert user.splitlines()[2:4] == ["B. Carbon dioxide", "D. All other options are wrong."]
    assert "Oxygen" not in user
    assert "Nitrogen" not in user


def test_chain_options_custom_substitute_text() -> None:
    shown = chain_options(Q, 0, substitute_text="None of the others is right.")
    assert shown[0] == ShownOption(0, "A", "None of the others is right.")


# ---------------------------------------------------------------- Prompt forms


def test_prompt_messages_chat() -> None:
    prompt = render(Q, all_options(Q), PromptTemplate(system_prompt="You are a tutor."))
    assert prompt.messages() == [
        {"role": "system", "content": "You are a tutor."},
        {"role": "user", "content": prompt.user},
        {"role": "assistant", "content": "Answer:"},
    ]


def test_prompt_messages_without_system() -> None:
    prompt = render(Q, all_options(Q), PromptTemplate())
    assert prompt.messages() == [
        {"role": "user", "content": prompt.user},
        {"role": "assistant", "content": "Answer:"},
    ]


def test_prompt_text_plain() -> None:
    prompt = render(Q, all_options(Q), PromptTemplate(chat=False))
    assert prompt.text == prompt.user + "\nAnswer:"
    assert prompt.text.endswith(f"D. Helium\n{INSTRUCTION}\nAnswer:")
    assert Prompt(user="Q", answer_prefix="A:", chat=False).text == "Q\nA:"


# ---------------------------------------------------------------- parse_answer


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (" B", "B"),
        ("B", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("(B)", "B"),
        ("**B**", "B"),
        ("Answer: B", "B"),
        ("answer: B", "B"),
        ("Answer:B", "B"),
        (" Answer - B", "B"),
        ("The answer is C", "C"),
        ("The correct answer is: C", "C"),
        ("Option D", "D"),
        (" C. Nitrogen", "C"),
        ("B) Carbon dioxide", "B"),
        ("\nD\n", "D"),
        ('"A"', "A"),
        ("_A_", "A"),
        ("**Answer:** B", "B"),
        ("Answer: (C)", "C"),
        # not an option letter
        ("Because plants breathe", None),
        ("Because...", None),
        ("Carbon dioxide", None),
        ("", None),
        ("   ", None),
        ("?", None),
        ("1", None),
        ("b", None),  # a lowercase word-letter is not taken ("a" is an article)
        ("a. Oxygen", None),
        ("E", None),  # a letter not allowed
        ("Answer: Z", None),
    ],
)
def test_parse_answer(reply: str, expected: str | None) -> None:
    assert parse_answer(reply, ABCD) == expected


def test_parse_answer_respects_allowed_subset() -> None:
    # chain step: A and C removed, B and D (kept letters) allowed
    assert parse_answer(" B", ["B", "D"]) == "B"
    assert parse_answer(" D", ["B", "D"]) == "D"
    assert parse_answer(" A", ["B", "D"]) is None
    assert parse_answer(" C", ["B", "D"]) is None


def test_letter_forms() -> None:
    assert letter_forms("C") == ("C", " C")


# ---------------------------------------------------------------- letters.py


VOCAB = {"A": [10], " A": [20], "B": [11], " B": [21], "C": [12], " C": [99, 12], "D": [7, 8]}


def _encode(text: str) -> list[int]:
    return list(VOCAB.get(text, [0, 0]))


def test_letter_token_ids_single_token_forms_only() -> None:
    table = letter_token_ids(["A", "B", "C"], _encode)
    assert table == {"A": [10, 20], "B": [11, 21], "C": [12]}


def test_letter_token_ids_dedupes_same_id() -> None:
    table = letter_token_ids(["A"], lambda text: [5])
    assert table == {"A": [5]}


def test_letter_token_ids_raises_without_single_token() -> None:
    # An engine feature the letter lacks (HTTP 400 naming the letter and sampling mode),
    # not an engine failure.
    with pytest.raises(UnreadableLetter, match="'D'") as raised:
        letter_token_ids(["A", "D"], _encode)
    assert isinstance(raised.value, EngineFeatureMissing)
    assert "mode=sampling" in str(raised.value)


def test_combine_letter_logprobs_logsumexp() -> None:
    table = {"A": [10, 20], "B": [11, 21], "C": [12]}
    reads = {10: math.log(0.2), 20: math.log(0.3), 11: math.log(0.05), 12: math.log(0.1)}
    out = combine_letter_logprobs(table, reads, ["A", "B", "C"])
    assert out["A"] == pytest.approx(math.log(0.5), abs=1e-12)
    assert out["B"] == pytest.approx(math.log(0.05), abs=1e-12)  # " B" missing: ignored
    assert out["C"] == pytest.approx(math.log(0.1), abs=1e-12)
    assert set(out) == {"A", "B", "C"}


def test_combine_letter_logprobs_only_requested_labels() -> None:
    table = {"A": [10, 20], "B": [11, 21]}
    out = combine_letter_logprobs(table, {10: -1.0, 11: -2.0}, ["B"])
    assert out == {"B": -2.0}


def test_combine_letter_logprobs_minus_inf_and_missing() -> None:
    table = {"A": [10, 20], "B": [11]}
    out = combine_letter_logprobs(table, {10: -math.inf, 20: -math.inf, 11: -1.0}, ["A", "B"])
    assert out["A"] == -math.inf
    out = combine_letter_logprobs(table, {10: -math.inf, 20: math.log(0.25)}, ["A"])
    assert out["A"] == pytest.approx(math.log(0.25))
    with pytest.raises(KeyError):
        combine_letter_logprobs(table, {10: -1.0}, ["B"])


def test_combine_letter_logprobs_stable_for_large_values() -> None:
    out = combine_letter_logprobs({"A": [1, 2]}, {1: -1000.0, 2: -1000.0}, ["A"])
    assert out["A"] == pytest.approx(-1000.0 + math.log(2))


def test_choice_strings() -> None:
    assert choice_strings(["B", "D"]) == ("B", " B", "D", " D")
