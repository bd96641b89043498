"""How well admission predicts a request's finish time (issue 20), on ``ufcal serve`` with
the default settings and the in-process engine (what ``make serve`` runs)::

    python -m service.bench.prediction [--rounds 2] [--out reports/prediction.json]

1. start a fresh ``ufcal serve``; cold: two 4-option questions, then 11, 13 and 26 options
   one at a time in both modes (the issue's sequence; nothing else running);
2. warm: ``--rounds`` more passes of the same sequence on other questions.

For each phase: the replies by status, and the error of the prediction from the service's
own histogram ``ufcal_admission_predicted_over_actual`` (predicted / actual seconds from
arrival to reply; requests admitted before the rate was measured are not in it): the share
within 0.5x to 2x, and the median and p90 of the ratio, interpolated within its buckets.
Prints the figures and writes them as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from service.bench.histograms import accuracy, histogram
from service.bench.questions import questions_with_options
from service.bench.report_file import write_report
from service.bench.serve_process import serve_process

SEQUENCE = [(4, "logprobs"), (4, "logprobs")] + [
    (m, mode) for mode in ("logprobs", "sampling") for m in (11, 13, 26)
]


async def _phase(client: httpx.AsyncClient, data: Path, offset: int) -> dict[str, Any]:
    before = histogram((await client.get("/metrics")).text)
    codes: Counter[int] = Counter()
    seconds: list[float] = []
    fitted: list[str] = []  # "options/mode: budget" of replies whose default budget was fitted
    for m, mode in SEQUENCE:
        question = questions_with_options(data, m, offset + 1)[offset]
        body = {"question": question.question, "options": list(question.options), "mode": mode}
        started = time.perf_counter()
        reply = await client.post("/score", json=body)
        seconds.append(round(time.perf_counter() - started, 2))
        codes[reply.status_code] += 1
        usage = reply.json().get("usage", {}) if reply.status_code == 200 else {}
        if usage.get("budget_fitted"):
            fitted.append(f"{m}/{mode}: {usage['max_prompts']}")
    after = histogram((await client.get("/metrics")).text)
    return {
        "by_status": {str(k): v for k, v in sorted(codes.items())},
        "seconds": seconds,
        "budget_fitted": fitted,
        **accuracy(before, after),
    }


async def _run(base: str, data: Path, rounds: int) -> Any:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        cold = await _phase(client, data, 0)
        before = histogram((await client.get("/metrics")).text)
        warm_rounds = [await _phase(client, data, 1 + r) for r in range(rounds)]
        after = histogram((await client.get("/metrics")).text)
    return {"cold": cold, "warm_rounds": warm_rounds, "warm": accuracy(before, after)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", default="../shared/data/mcqa")
    parser.add_argument("--out", default="reports/prediction.json")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    with serve_process("prediction", args.start_timeout) as base:
        report = asyncio.run(_run(base, Path(args.data), args.rounds))
    write_report(report, args.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
