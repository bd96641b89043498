"""Free-form evaluation: questions with a reference answer, graded by normalised match.

Two kinds of dataset:

* **A shared multiple-choice set asked without its options** (``load_freeform_mcqa``): the
  question alone; the gold option's text is the reference. Questions whose gold option
  only makes sense beside the others ("All of the above", "Both A and B") are left out
  (``refers_to_options``). Its dataset name is the file's with ``-freeform`` appended, so
  that its rows never share a key with the multiple-choice rows of the same file.
* **The arithmetic ladder** (``arithmetic_items``): generated, seeded, exact answers,
  difficulty growing with the rung (``service.evaluation.arithmetic``).

Grading (``grade_answer``): a reference that is an integer is matched by value
(``arithmetic.parse_number`` on the reply: "15", "15.0", "7 + 8 = 15" all give 15); any
other reference by SQuAD's normalised exact match (lower case, punctuation and articles
removed, whitespace collapsed) of the cleaned reply.

One free-form question scored once gives four rows, one per confidence, all on the same
samples (``FREEFORM_CONFIDENCES``): ``uf`` = (1 - U) * F(answer) over the groups,
``fidelity`` = F(answer), and the two anchors of the free-form literature, which answer
with the largest group: ``largest_share`` (its share of the usable samples) and
``semantic_entropy`` (1 - the normalised discrete semantic entropy over the groups).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.engines.base import Engine, EngineError
from service.evaluation import arithmetic
from service.evaluation.data import Item, load_mcqa, select
from service.evaluation.results import ResultsFile
from service.evaluation.runner import EvalStats, run_pending
from service.scoring import ScoreParams, Unscorable, Usage

__all__ = [
    "ARITHMETIC",
    "FREEFORM_CONFIDENCES",
    "FreeformItem",
    "arithmetic_items",
    "confidence_rows",
    "grade_answer",
    "load_freeform_mcqa",
    "refers_to_options",
    "run_freeform_eval",
]

ARITHMETIC = "arithmetic"  # the name of the generated ladder among the FILES
FREEFORM_SUFFIX = "-freeform"
FREEFORM_CONFIDENCES = ("uf", "fidelity", "largest_share", "semantic_entropy")


@dataclass(frozen=True)
class FreeformItem:
    """One free-form question: its text, the reference answer and, for the ladder, the
    rung (``level``: 1-based rank, ``level_name``: e.g. ``add2``)."""

    dataset: str
    id: str
    question: str
    reference: str
    subject: str | None = None
    level: int | None = None
    level_name: str | None = None


# ----------------------------------------------------------------------- datasets

_REFERS = re.compile(
    r"\b(?:of the above|of these|of the options|of the choices)\b"
    r"|^(?:both|neither)\b|\b[a-e] and [a-e]\b"
)


def refers_to_options(text: str) -> bool:
    """Whether an option's text points at the other options ("All of the above", "Both
    of these", "(A) and (B)"): meaningless as a free-form reference."""
    return bool(_REFERS.search(" ".join(text.lower().replace("(", " ").replace(")", " ").split())))


def from_mcqa(item: Item) -> FreeformItem:
    """A multiple-choice item asked without its options: the gold text is the reference."""
    return FreeformItem(
        dataset=item.dataset + FREEFORM_SUFFIX,
        id=item.id,
        question=item.question,
        reference=item.options[item.answer].strip(),
        subject=item.subject,
    )


def load_freeform_mcqa(
    path: str | Path, limit: int | None = None, per_subject: int | None = None
) -> list[FreeformItem]:
    """The questions of a shared MCQA file as free-form questions, selected as
    ``ufcal eval`` selects them (``data.select``), those whose gold refers to the other
    options left out before the limit applies."""
    usable = [i for i in load_mcqa(path) if not refers_to_options(i.options[i.answer])]
    return [from_mcqa(i) for i in select(usable, limit, per_subject)]


def arithmetic_items(
    levels: Sequence[str] = arithmetic.DEFAULT_LEVELS, per_level: int = 30, seed: int = 0
) -> list[FreeformItem]:
    """``per_level`` questions of every rung of the ladder, seeded (``arithmetic.generate``)."""
    items = []
    for row in arithmetic.generate(levels, per_level, seed):
        items.append(
            FreeformItem(
                dataset=ARITHMETIC,
                id=str(row["id"]),
                question=str(row["question"]),
                reference=str(row["answer"]),
                level=int(row["level"]),
                level_name=str(row["id"]).split("-")[1],
            )
        )
    return items


def grade_answer(prediction: str, reference: str) -> bool:
    """Whether a reply gives the reference: integers by value, any other text by SQuAD's
    normalised exact match (``arithmetic.grade``)."""
    return arithmetic.grade(prediction, reference)


# ----------------------------------------------------------------------- rows


def _usage(usage: Usage | None) -> dict[str, Any]:
    return vars(usage).copy() if usage is not None else {}


def confidence_rows(
    item: FreeformItem,
    outcome: Any,
    methods: Sequence[str],
    mode: str,
    run_id: str,
    run_started: float,
) -> list[dict[str, Any]]:
    """The results-file rows of one scored question, one per confidence of ``methods``
    (``outcome``: a ``FreeformResult``, or the ``Unscorable`` it raised). The cost
    (usage, judge prompts, latency) is the whole question's, repeated on each row."""
    base: dict[str, Any] = {
        "dataset": item.dataset,
        "id": item.id,
        "task": "free_form",  # ufcal calibrate keeps these labels apart from multiple choice
        "mode": mode,
        "subject": item.subject,
        "level": item.level,
        "level_name": item.level_name,
        "reference": item.reference,
    }
    stamp = {"run": run_id, "run_started": run_started, "finished": time.time()}
    if isinstance(outcome, Unscorable):
        return [
            {**base, "method": m, "error": str(outcome), "usage": _usage(outcome.usage), **stamp}
            for m in methods
        ]
    largest = outcome.groups[0].representative
    uf_correct = grade_answer(outcome.answer, item.reference)
    largest_correct = grade_answer(largest, item.reference)
    answer_index = outcome.uf.answer
    answers = {
        "uf": (outcome.answer, uf_correct, outcome.confidence),
        "fidelity": (outcome.answer, uf_correct, outcome.uf.fidelity[answer_index]),
        "largest_share": (largest, largest_correct, outcome.largest_group_share),
        "semantic_entropy": (largest, largest_correct, 1.0 - outcome.semantic_entropy_normalized),
    }
    shared = {
        "model": outcome.uf.model,
        "samples": outcome.samples,
        "samples_usable": outcome.samples_usable,
        "samples_correct": sum(grade_answer(s, item.reference) for s in outcome.samples),
        "groups": [[g.representative, g.count] for g in outcome.groups],
        "extra_option": outcome.extra_option,
        "uncertainty": outcome.uf.uncertainty,
        "largest_group_share": outcome.largest_group_share,
        "semantic_entropy": outcome.semantic_entropy,
        "judge_prompts": outcome.judge_prompts,
        "judge_rounds": outcome.judge_rounds,
        "uf_prompts": outcome.uf_prompts,
        "usage": _usage(outcome.usage),
        "latency_ms": round(outcome.latency_s * 1000.0, 3),
    }
    rows = []
    for method in methods:
        answer, correct, confidence = answers[method]
        rows.append(
            {
                **base,
                "method": method,
                "answer": answer,
                "correct": correct,
                "confidence": float(confidence),
                **shared,
                **stamp,
            }
        )
    return rows


# ----------------------------------------------------------------------- runner


def interleave_lanes(
    pending: Sequence[tuple[FreeformItem, list[str]]],
) -> list[tuple[FreeformItem, list[str]]]:
    """Round-robin over the (dataset, rung) lanes, each in order, so that a run stopped
    early has made even progress on every dataset and every rung of the ladder."""
    lanes: dict[tuple[str, int | None], list[tuple[FreeformItem, list[str]]]] = {}
    for entry in pending:
        lanes.setdefault((entry[0].dataset, entry[0].level), []).append(entry)
    queues = list(lanes.values())
    longest = max(map(len, queues), default=0)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


async def run_freeform_eval(
    items: Sequence[FreeformItem],
    methods: Sequence[str],
    engine: Engine,
    context: Any,
    params: ScoreParams,
    results: ResultsFile,
    *,
    concurrency: int = 16,
    progress: bool = True,
) -> EvalStats:
    """Score every item free-form once (``score_freeform``, UF in ``params.mode``) and
    write the rows of ``methods`` not yet in ``results``; resumable like ``run_eval``.
    ``context`` is the ``FreeformContext`` (template, judge)."""
    from service.scoring import resolve_mode
    from service.scoring_freeform import score_freeform

    started = time.time()
    run_id = uuid.uuid4().hex[:12]
    stats = EvalStats(questions=len(items))
    mode = resolve_mode(params.mode, engine)
    pending: list[tuple[FreeformItem, list[str]]] = []
    for item in items:
        todo = [m for m in methods if (item.dataset, item.id, m, mode) not in results.done]
        if todo:
            pending.append((item, todo))
        else:
            stats.skipped += 1

    async def score_one(item: FreeformItem, todo: list[str]) -> None:
        outcome: Any
        try:
            outcome = await score_freeform(item.question, engine, params, context=context)
        except Unscorable as exc:
            outcome = exc
        except EngineError as exc:
            stats.failed += 1
            stats.errors.append(f"{item.dataset}/{item.id}: {exc}")
            return
        for row in confidence_rows(item, outcome, todo, mode, run_id, started):
            results.append(row)
            stats.written += 1
        stats.unscorable += isinstance(outcome, Unscorable)

    try:
        await run_pending(interleave_lanes(pending), score_one, concurrency, progress)
    finally:
        stats.wall_s = time.time() - started
    return stats
