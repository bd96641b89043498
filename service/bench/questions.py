"""Questions of a given option count for the benchmark sweep and the option-count tests:
real many-option questions where the data has them (TruthfulQA mc1 has up to 13 options),
else a real question with distractors taken from other questions' options."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MANY_OPTIONS_FILE = "truthfulqa_mc1_validation.jsonl"
DISTRACTOR_FILE = "arc_challenge_test.jsonl"


@dataclass(frozen=True)
class SizedQuestion:
    """A question of exactly ``len(options)`` options; ``padded`` counts the distractors
    added from other questions (0: a real question as the data has it)."""

    id: str
    question: str
    options: tuple[str, ...]
    padded: int


def _rows(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def questions_with_options(
    data_dir: Path, n_options: int, count: int, files: Sequence[str] = (MANY_OPTIONS_FILE,)
) -> list[SizedQuestion]:
    """``count`` questions of ``n_options`` options: real rows with exactly that many first,
    then rows with more (their first ``n_options`` options, the gold first in TruthfulQA),
    then rows with fewer padded with other questions' options (from ARC-Challenge)."""
    rows = [row for name in files for row in _rows(data_dir / name)]
    exact = [r for r in rows if len(r["options"]) == n_options]  # type: ignore[arg-type]
    more = [r for r in rows if len(r["options"]) > n_options]  # type: ignore[arg-type]
    fewer = sorted(
        (r for r in rows if len(r["options"]) < n_options),  # type: ignore[arg-type]
        key=lambda r: -len(r["options"]),  # type: ignore[arg-type]
    )
    pool = [str(o) for r in _rows(data_dir / DISTRACTOR_FILE) for o in r["options"]]  # type: ignore[attr-defined]
    out: list[SizedQuestion] = []
    taken = 0
    for row in [*exact, *more, *fewer]:
        if len(out) >= count:
            break
        options = [str(o) for o in row["options"]][:n_options]  # type: ignore[attr-defined]
        padded = n_options - len(options)
        while len(options) < n_options:
            candidate = pool[taken % len(pool)]
            taken += 1
            if candidate not in options:
                options.append(candidate)
        out.append(SizedQuestion(str(row["id"]), str(row["question"]), tuple(options), padded))
    return out
