"""A burst against ``ufcal serve`` on the in-process engine (what ``make serve`` runs), beside
``ufcal bench`` variant b on the same machine in the same run::

    python -m service.bench.burst [--requests 200] [--b-questions 64] [--out reports/burst.json]

1. start ``ufcal serve`` with the default settings (UFCAL_REQUEST_TIMEOUT_S 20 s, ...);
2. warm it with 16 questions at once (a service in use has measured its engine's rate);
3. send ``--requests`` 4-option UF questions (ARC-Challenge) all at once; count the replies
   by status; goodput = answered questions / (first request sent -> last reply received);
4. stop the server, start the same engine in this process and run variant b (UF logprobs,
   lockstep chains, 32 questions in flight) on ``--b-questions`` other ARC questions.

Prints the figures and the ratio goodput / variant b; writes them as JSON."""

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
from service.bench.report_file import write_report
from service.bench.serve_process import serve_process
from service.config import Settings
from service.evaluation.data import load_mcqa

WARM = 16


def _body(item: Any) -> dict[str, Any]:
    return {"question": item.question, "options": list(item.options), "method": "uf"}


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


async def _burst(base: str, items: list[Any], warm: list[Any]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=len(items) + 8)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        warmed = await asyncio.gather(*(client.post("/score", json=_body(i)) for i in warm))
        metrics = (await client.get("/metrics")).text
        rate_before = _metric(metrics, "ufcal_engine_prompts_per_second")
        predicted_before = histogram(metrics)
        latencies: dict[int, list[float]] = {}

        async def one(item: Any) -> int:
            started = time.perf_counter()
            reply = await client.post("/score", json=_body(item))
            latencies.setdefault(reply.status_code, []).append(time.perf_counter() - started)
            return reply.status_code

        started = time.perf_counter()
        codes = Counter(await asyncio.gather(*(one(i) for i in items)))
        wall = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
    answered = codes.get(200, 0)
    ok_latency = sorted(latencies.get(200, []))
    return {
        "warm_up": dict(Counter(r.status_code for r in warmed)),
        "engine_prompts_per_s_before": rate_before,
        "engine_prompts_per_s_after": _metric(metrics, "ufcal_engine_prompts_per_second"),
        "requests": len(items),
        "by_status": {str(k): v for k, v in sorted(codes.items())},
        "share_504": round(codes.get(504, 0) / len(items), 4),
        "wall_s": round(wall, 2),
        "goodput_questions_per_s": round(answered / wall, 3) if wall > 0 else 0.0,
        "answered_p50_s": round(ok_latency[len(ok_latency) // 2], 2) if ok_latency else None,
        "answered_max_s": round(ok_latency[-1], 2) if ok_latency else None,
        "refused_max_s": round(max(latencies.get(429, [0.0])), 3),
        "prediction": accuracy(predicted_before, histogram(metrics)),
    }


async def _variant_b(items: list[Any]) -> dict[str, Any]:
    from service.calibration.prompts import Question
    from service.engines import build_engine

    from .runner import run_engine_variants

    settings = Settings()
    engine = await build_engine(settings)
    await engine.start()
    try:
        questions = [Question(i.question, i.options) for i in items]
        results = await run_engine_variants(
            engine, questions, settings.prompt_template(), variants=["b"]
        )
    finally:
        await engine.close()
    return results["b"].summary()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--b-questions", type=int, default=64)
    parser.add_argument("--data", default="../shared/data/mcqa/arc_challenge_test.jsonl")
    parser.add_argument("--out", default="reports/burst.json")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    rows = [r for r in load_mcqa(Path(args.data)) if len(r.options) == 4]
    warm, burst = rows[:WARM], rows[WARM : WARM + args.requests]
    b_items = rows[WARM + args.requests : WARM + args.requests + args.b_questions]

    with serve_process("burst", args.start_timeout) as base:
        print("burst ...", file=sys.stderr, flush=True)
        burst_figures = asyncio.run(_burst(base, burst, warm))
    print("variant b ...", file=sys.stderr, flush=True)
    b = asyncio.run(_variant_b(b_items))
    ratio = burst_figures["goodput_questions_per_s"] / b["questions_per_s"]
    report = {"burst": burst_figures, "variant_b": b, "goodput_over_b": round(ratio, 3)}
    write_report(report, args.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
