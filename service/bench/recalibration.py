"""What recalibration costs: applying a calibrator, refitting one, and /score's overhead at
concurrency 64 without a calibrator, with one active, and with refits running meanwhile.

    python -m service.bench.recalibration [--requests 2000] [--out reports/recalibration.json]

The overhead runs use the instant engine of ``service.bench.overhead`` (server and load
generator on separate cores where there are two), so they measure the service alone."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.bench.overhead import QUESTION, instant_server, load, split_cores
from service.calibration import recalibrate as rc

KEY = ("instant", "uf", "logprobs")


def _labels(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.uniform(0, 1, n)
    return s, rng.uniform(0, 1, n) < s**2


def apply_cost(calls: int = 200_000) -> dict[str, float]:
    """Microseconds per ``recalibrate.apply`` call, per kind (fitted on 3000 labels)."""
    s, y = _labels(3000)
    out: dict[str, float] = {}
    for kind in rc.KINDS:
        calibrator = rc.fit_kind(kind, s, y)
        started = time.perf_counter()
        for i in range(calls):
            rc.apply(calibrator, (i % 1000) / 1000.0)
        out[kind] = round((time.perf_counter() - started) / calls * 1e6, 3)
    return out


def refit_cost(n: int = 3000, repeats: int = 5) -> dict[str, float]:
    """Seconds to choose and fit a calibrator (``fit``) and to run a whole refit decision
    (``refit``: two fits and the hold-out check) on ``n`` labels; medians."""
    s, y = _labels(n, seed=1)
    rc.fit_kind("platt", s[:50], y[:50])  # scikit-learn's import is not part of a refit
    fits, refits = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        rc.fit(s, y)
        fits.append(time.perf_counter() - started)
        started = time.perf_counter()
        rc.refit(s, y, None)
        refits.append(time.perf_counter() - started)
    return {
        "labels": n,
        "fit_s": round(statistics.median(fits), 4),
        "refit_s": round(statistics.median(refits), 4),
    }


def _calibrator_file(directory: str) -> str:
    s, y = _labels(3000)
    calibrator = rc.fit_kind("beta", s, y)
    entry = {"model": KEY[0], "method": KEY[1], "mode": KEY[2], **calibrator.to_json()}
    path = os.path.join(directory, "calibrators.json")
    Path(path).write_text(json.dumps({"calibrators": [entry]}))
    return path


async def _label(url: str, ids: range, rate: float | None) -> int:
    """Score (with the given ids) and label them; at ``rate`` labels/s if given."""
    import aiohttp

    sent = 0
    async with aiohttp.ClientSession(url) as session:
        for i in ids:
            body = {**QUESTION, "id": f"b{i}"}
            async with session.post("/score", json=body) as response:
                await response.read()
            started = time.perf_counter()
            async with session.post("/feedback", json={"id": f"b{i}", "correct": i % 3 == 0}) as r:
                await r.read()
            sent += 1
            if rate:
                await asyncio.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - started)))
    return sent


async def _load_with_refits(url: str, requests: int, label_rate: float) -> dict[str, Any]:
    """The c=64 load while labels arrive and trigger refits."""
    labeller = asyncio.create_task(_label(url, range(3000, 1_000_000), label_rate))
    try:
        row = await load(url, 64, requests)
    finally:
        labeller.cancel()
    return row


def overhead(requests: int, label_rate: float) -> list[dict[str, Any]]:
    """/score at c=64: no calibrator, an active one, an active one with refits running."""
    split = split_cores()
    server_cores = split[0] if split else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cal = _calibrator_file(tmp)
        online = {
            "UFCAL_CALIBRATORS": cal,
            "UFCAL_RECALIBRATE": "online",
            "UFCAL_RECALIBRATE_EVERY": "50",
            "UFCAL_CALIBRATION_WINDOW": "3000",
            "UFCAL_LOG_LEVEL": "warning",
        }
        variants = [
            ("no calibrator", {}),
            ("calibrator active", {"UFCAL_CALIBRATORS": cal}),
            ("calibrator active, refits running", online),
        ]
        mine = os.sched_getaffinity(0) if split else None
        for name, env in variants:
            with instant_server(server_cores, env) as url:
                if split:
                    os.sched_setaffinity(0, split[1])
                try:
                    asyncio.run(load(url, 8, 200))  # warm-up
                    if "UFCAL_RECALIBRATE" in env:
                        asyncio.run(_label(url, range(3000), None))  # a full window first
                        row = asyncio.run(_load_with_refits(url, requests, label_rate))
                        row["refits"] = _refits(url)
                    else:
                        row = asyncio.run(load(url, 64, requests))
                finally:
                    if mine is not None:
                        os.sched_setaffinity(0, mine)
            row["variant"] = name
            rows.append(row)
    return rows


def _refits(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "ufcal_recalibrations_total":
                out[sample.labels["outcome"]] = sample.value
            if sample.name == "ufcal_recalibration_duration_seconds_sum":
                out["seconds_total"] = round(sample.value, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="per overhead variant")
    parser.add_argument("--label-rate", type=float, default=100.0, help="labels/s during refits")
    parser.add_argument("--out", default="reports/recalibration.json")
    parser.add_argument("--no-overhead", action="store_true")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"apply_us": apply_cost(), "refit": refit_cost()}
    print(json.dumps(report), flush=True)
    if not args.no_overhead:
        report["overhead_c64"] = overhead(args.requests, args.label_rate)
        base = report["overhead_c64"][0]
        for row in report["overhead_c64"]:
            row["p99_vs_none"] = round(row["p99_ms"] / base["p99_ms"], 3)
            row["p50_delta_ms"] = round(row["p50_ms"] - base["p50_ms"], 3)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
