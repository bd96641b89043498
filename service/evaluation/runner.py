"""``ufcal eval``: score MCQA questions with several methods through the scorer, resumably.

Questions run concurrently (``concurrency`` in flight) so that the engine batches their
prompts; the methods of one question share identical engine steps (``score_methods``). Each
(dataset, id, method, mode) is written to the results file as soon as it is scored; keys
already in the file are skipped, so a rerun after an interruption continues where it stopped."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.calibration.prompts import PromptTemplate, Question
from service.config import Mode, Settings
from service.engines.base import Engine, EngineError
from service.evaluation.data import Item
from service.evaluation.results import ResultsFile
from service.scoring import (
    Method,
    ScoreParams,
    ScoreResult,
    Unscorable,
    Usage,
    method_mode,
    score_methods,
)

T = TypeVar("T")
M = TypeVar("M")

__all__ = ["EvalStats", "result_row", "run_eval"]


def eval_params(mode: Mode | None, samples: int | None, settings: Settings) -> ScoreParams:
    """An eval's scoring parameters: the service's settings, with the command's ``--mode``
    and ``--samples`` over them when given."""
    return ScoreParams(
        method="uf",
        mode=mode or settings.mode,
        samples=samples or settings.samples,
        temperature=settings.temperature,
        tau=settings.tau,
        eps=settings.eps,
        skip_mass=settings.skip_mass,
        max_prompts=settings.max_prompts_per_question,
    )


@dataclass
class EvalStats:
    """What one ``run_eval`` call did."""

    questions: int = 0
    skipped: int = 0
    written: int = 0
    unscorable: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _usage(usage: Usage | None) -> dict[str, int]:
    return vars(usage).copy() if usage is not None else {}


def result_row(
    item: Item,
    method: Method,
    mode: str,
    outcome: ScoreResult | Unscorable,
    run_id: str,
    run_started: float,
) -> dict[str, Any]:
    """The results-file row of one (question, method)."""
    labels = Question(item.question, item.options).labels
    row: dict[str, Any] = {
        "dataset": item.dataset,
        "id": item.id,
        "method": method,
        "mode": mode,
        "subject": item.subject,
        "gold": item.answer,
        "perm": list(item.perm),
    }
    if isinstance(outcome, Unscorable):
        row.update(error=str(outcome), usage=_usage(outcome.usage))
    else:
        row.update(
            model=outcome.model,
            answer=outcome.answer,
            correct=outcome.answer == item.answer,
            confidence=outcome.confidence,
            uncertainty=outcome.uncertainty,
            distribution=dict(zip(labels, outcome.distribution, strict=True)),
            fidelity=dict(zip(labels, outcome.fidelity, strict=True)),
            chains={labels[s]: [labels[i] for i in c] for s, c in outcome.chains.items()},
            usage=_usage(outcome.usage),
            latency_ms=round(outcome.latency_s * 1000.0, 3),
        )
    row.update(run=run_id, run_started=run_started, finished=time.time())
    return row


def _interleave(pending: Sequence[tuple[Item, list[Method]]]) -> list[tuple[Item, list[Method]]]:
    """Round-robin over the datasets (each in file order), so that a run stopped early has
    made even progress on every dataset."""
    by_dataset: dict[str, list[tuple[Item, list[Method]]]] = {}
    for entry in pending:
        by_dataset.setdefault(entry[0].dataset, []).append(entry)
    lanes = list(by_dataset.values())
    return [
        lane[i] for i in range(max(map(len, lanes), default=0)) for lane in lanes if i < len(lane)
    ]


async def run_eval(
    items: Sequence[Item],
    methods: Sequence[Method],
    engine: Engine,
    template: PromptTemplate,
    params: ScoreParams,
    results: ResultsFile,
    *,
    concurrency: int = 16,
    progress: bool = True,
) -> EvalStats:
    """Score every item with every method not yet in ``results``; append rows as they come.

    An engine failure on one question is counted and reported (that question is retried by
    the next run); an unscorable method (no reply parsed) is written as a row with ``error``."""
    started = time.time()
    run_id = uuid.uuid4().hex[:12]
    stats = EvalStats(questions=len(items))
    modes = {m: method_mode(m, params.mode, engine) for m in methods}
    pending: list[tuple[Item, list[Method]]] = []
    for item in items:
        todo = [m for m in methods if (item.dataset, item.id, m, modes[m]) not in results.done]
        if todo:
            pending.append((item, todo))
        else:
            stats.skipped += 1

    async def score_one(item: Item, todo: list[Method]) -> None:
        question = Question(item.question, item.options)
        outcomes = await score_methods(question, engine, params, todo, template)
        engine_errors = [o for o in outcomes.values() if isinstance(o, EngineError)]
        for method, outcome in outcomes.items():
            if isinstance(outcome, ScoreResult | Unscorable):
                results.append(result_row(item, method, modes[method], outcome, run_id, started))
                stats.written += 1
                stats.unscorable += isinstance(outcome, Unscorable)
            elif not isinstance(outcome, EngineError):
                raise outcome
        if engine_errors:
            stats.failed += 1
            stats.errors.append(f"{item.dataset}/{item.id}: {engine_errors[0]}")

    try:
        await run_pending(_interleave(pending), score_one, concurrency, progress)
    finally:
        stats.wall_s = time.time() - started
    return stats


async def run_pending(
    pending: Sequence[tuple[T, list[M]]],
    score_one: Callable[[T, list[M]], Awaitable[None]],
    concurrency: int,
    progress: bool,
) -> None:
    """Run ``score_one`` on each (item, methods to do) in order, ``concurrency`` at a time,
    with a progress bar on stderr when ``progress``: the loop of every eval."""
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit="q", file=sys.stderr, desc="eval", dynamic_ncols=True)
    queue: asyncio.Queue[tuple[T, list[M]]] = asyncio.Queue()
    for entry in pending:
        queue.put_nowait(entry)

    async def worker() -> None:
        while True:
            try:
                item, todo = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await score_one(item, todo)
            if bar is not None:
                bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        if bar is not None:
            bar.close()
