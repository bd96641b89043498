"""The option-count sweep of ``ufcal bench`` over the fake engine (the real one is in
docs/performance.md): every row measured, the predictions beside it."""

from __future__ import annotations

from service.bench.questions import questions_with_options
from service.bench.sweep import format_sweep, predicted_round_trips, run_sweep
from service.calibration.prompts import PromptTemplate
from tests.servers import SHARED_DATA
from tests.test_budget import _engine


def test_questions_of_every_size_are_real_first_then_padded() -> None:
    thirteen = questions_with_options(SHARED_DATA, 13, 2)
    assert thirteen[0].padded == 0 and len(thirteen[0].options) == 13
    for q in questions_with_options(SHARED_DATA, 26, 3):
        assert len(q.options) == 26 == len(set(q.options))
        assert q.padded > 0


async def test_sweep_rows_and_predictions() -> None:
    rows = await run_sweep(_engine(), SHARED_DATA, PromptTemplate(), option_counts=(2, 4, 26), n=3)
    assert [r["options"] for r in rows] == [2, 4, 26]
    for row in rows:
        # the fake's chains never come back: every question costs its worst case
        assert row["prompts_per_q"] == row["predicted_max_prompts"]
        assert row["round_trips_per_q"] <= row["predicted_max_round_trips"]
        assert row["failed"] == 0 and row["questions"] == 3
    assert rows[2]["budget_hits"] == 3 and rows[1]["budget_hits"] == 0
    assert predicted_round_trips(26, 64) == 26 and predicted_round_trips(26, 5) == 5
    assert "| 26 | 3 (0) |" in format_sweep(rows, 64)
