"""MCQA evaluation data: load the shared JSONL format, select, permute options.

One JSON object per line: ``{"id", "dataset", "subject", "question", "options", "answer"}``
(``answer`` is the 0-based gold index). Options are permuted with a fixed seed per question,
because some sets always put the gold first (TruthfulQA mc1)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Item", "load_mcqa", "permute", "select"]


@dataclass(frozen=True)
class Item:
    """One question as evaluated. ``perm[i]`` is the source position of shown option ``i``."""

    dataset: str
    id: str
    subject: str | None
    question: str
    options: tuple[str, ...]
    answer: int
    perm: tuple[int, ...] = ()


def load_mcqa(path: str | Path) -> list[Item]:
    """Every question of a shared MCQA JSONL file, in file order. The dataset name is the
    rows' ``dataset`` field, else the file name without extension."""
    path = Path(path)
    items: list[Item] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                options = tuple(str(o) for o in row["options"])
                answer = int(row["answer"])
                if not 0 <= answer < len(options):
                    raise ValueError(f"answer {answer} out of range")
                items.append(
                    Item(
                        dataset=str(row.get("dataset") or path.stem),
                        id=str(row.get("id", number)),
                        subject=None if row.get("subject") is None else str(row["subject"]),
                        question=str(row["question"]),
                        options=options,
                        answer=answer,
                        perm=tuple(range(len(options))),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: line {number}: {exc}") from exc
    return items


def select(
    items: Iterable[Item], limit: int | None = None, per_subject: int | None = None
) -> list[Item]:
    """The first ``per_subject`` questions of each subject (rows without a subject are all
    kept), then the first ``limit`` of those, in file order. A smaller selection is always a
    prefix-wise subset of a larger one, so a run can be extended and resumed."""
    chosen: list[Item] = []
    seen: dict[str, int] = {}
    for item in items:
        if per_subject is not None and item.subject is not None:
            if seen.get(item.subject, 0) >= per_subject:
                continue
            seen[item.subject] = seen.get(item.subject, 0) + 1
        chosen.append(item)
        if limit is not None and len(chosen) >= limit:
            break
    return chosen


def permutation(n: int, seed: int, dataset: str, item_id: str) -> list[int]:
    """A fixed permutation of ``range(n)`` for one question (same seed, same order)."""
    order = list(range(n))
    random.Random(f"{seed}:{dataset}:{item_id}").shuffle(order)  # noqa: S311 # reproducible, not secret
    return order


def permute(item: Item, seed: int) -> Item:
    """The item with its options shown in a fixed, seeded order; ``answer`` follows the gold."""
    order = permutation(len(item.options), seed, item.dataset, item.id)
    options = tuple(item.options[i] for i in order)
    return Item(
        dataset=item.dataset,
        id=item.id,
        subject=item.subject,
        question=item.question,
        options=options,
        answer=order.index(item.answer),
        perm=tuple(order),
    )


_NO_LIMIT = "all"


def split_limit(spec: str) -> tuple[str, int | str | None]:
    """``"file.jsonl:300"`` -> ("file.jsonl", 300); ``"file.jsonl:all"`` -> (.., "all");
    a name without a ``:N`` suffix -> (name, None), meaning "use --limit"."""
    name, sep, tail = spec.rpartition(":")
    if sep and name and (tail.isdigit() or tail == _NO_LIMIT):
        return name, int(tail) if tail.isdigit() else _NO_LIMIT
    return spec, None


def load_selection(
    paths: Sequence[str | Path | tuple[str | Path, int | str | None]],
    limit: int | None,
    per_subject: int | None,
    seed: int | None,
) -> list[Item]:
    """Load, select and (unless ``seed`` is None) permute the questions of every file. A
    ``(path, n)`` entry overrides ``limit`` for that file (``"all"``: no limit)."""
    items: list[Item] = []
    for entry in paths:
        path, own = entry if isinstance(entry, tuple) else (entry, None)
        file_limit = limit if own is None else (None if own == _NO_LIMIT else int(own))
        chosen = select(load_mcqa(path), file_limit, per_subject)
        items += [permute(i, seed) for i in chosen] if seed is not None else chosen
    return items
