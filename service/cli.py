"""``ufcal serve | score | metrics``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from service.config import Settings


def _serve(args: argparse.Namespace) -> int:
    from service.api.app import create_app
    from service.telemetry import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    host = args.host or settings.host
    port = args.port or settings.port
    return run_server(create_app(settings), settings, host, port)


def run_server(app: Any, settings: Settings, host: str, port: int) -> int:
    """Serve ``app`` until SIGTERM/SIGINT: stop accepting, let in-flight requests finish
    within ``UFCAL_SHUTDOWN_GRACE_S``, then exit 0; or exit non-zero when the app asks for
    it (the in-process engine died, so the orchestrator should restart the service)."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=settings.log_level,
            log_config=None,  # keep the JSON log lines configured above
            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        )
    )

    def request_shutdown() -> None:  # the same path as SIGTERM: drain, then stop
        server.should_exit = True

    app.state.request_shutdown = request_shutdown
    # uvicorn re-raises the signal it caught once it has drained; with these handlers that
    # ends here (exit 0) instead of killing the process by the default SIGTERM action.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server.run()
    code = int(getattr(app.state.ufcal, "exit_code", 0) or 0)
    if code:  # the engine died: its leftover threads would hold the exit for seconds
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _questions(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    if args.file:
        with Path(args.file).open(encoding="utf-8") as handle:
            count = 0
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if args.limit is not None and count >= args.limit:
                    return
                try:
                    row = json.loads(line)
                    yield {
                        "id": str(row.get("id", number)),
                        "question": str(row["question"]),
                        "options": [str(o) for o in row["options"]],
                        "gold": row.get("answer"),
                    }
                except (ValueError, KeyError, TypeError) as exc:
                    raise SystemExit(f"{args.file}: line {number}: {exc}") from exc
                count += 1
    else:
        if not args.question or not args.option:
            raise SystemExit("give --question and two or more --option, or --file")
        yield {"id": "1", "question": args.question, "options": args.option, "gold": None}


async def _score_all(args: argparse.Namespace) -> int:
    from service.api.score.protocol import ScoreRequest
    from service.api.score.serving import score_params, to_response
    from service.calibration.prompts import Question
    from service.engines import build_engine
    from service.scoring import Unscorable, score

    settings = Settings()
    engine = await build_engine(settings)
    await engine.start()
    template = settings.prompt_template()

    async def one(item: dict[str, Any]) -> str:
        body = ScoreRequest(
            id=item["id"],
            question=item["question"],
            options=item["options"],
            method=args.method,
            mode=args.mode or settings.mode,
            samples=args.samples or settings.samples,
        )
        question = Question(body.question, tuple(body.options))
        try:
            result = await score(question, engine, score_params(body, settings), template)
        except Unscorable as exc:
            return json.dumps({"id": item["id"], "error": str(exc)})
        out = to_response(result, item["id"]).model_dump()
        if item["gold"] is not None:
            out["gold"] = item["gold"]
            out["correct"] = result.answer == item["gold"]
        return json.dumps(out)

    try:
        # Keep several questions in flight so that the engine batches across them,
        # and print in input order.
        queue: list[asyncio.Task[str]] = []
        for item in _questions(args):
            task = asyncio.create_task(one(item))
            queue.append(task)
            if len(queue) >= args.concurrency:
                print(await queue.pop(0), flush=True)
        for task in queue:
            print(await task, flush=True)
    finally:
        await engine.close()
    return 0


def _score(args: argparse.Namespace) -> int:
    return asyncio.run(_score_all(args))


def _metrics(args: argparse.Namespace) -> int:
    from service.evaluation.metrics_file import metrics_command

    return metrics_command(args.file, args.bins)


def _eval(args: argparse.Namespace) -> int:
    from service.evaluation.command import eval_command

    return eval_command(args)


def _model(args: argparse.Namespace) -> int:
    from service.engines.embedded import prepare_embedded_model

    settings = Settings()
    print(prepare_embedded_model(Path(args.cache) if args.cache else settings.model_cache))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from service.bench.cli import bench_command

    return bench_command(args)


def _db(args: argparse.Namespace) -> int:
    from service.store.migrate import db_command

    return db_command(args, Settings())


def build_parser() -> argparse.ArgumentParser:
    """The ``ufcal`` command line."""
    parser = argparse.ArgumentParser(prog="ufcal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=None, help="default: UFCAL_HOST (127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="default: UFCAL_PORT (8000)")
    serve.set_defaults(func=_serve)

    sc = sub.add_parser("score", help="score questions to JSON lines on stdout")
    sc.add_argument("--question", help="the question text")
    sc.add_argument("--option", action="append", help="an option (repeat, in order)")
    sc.add_argument("--file", help="JSONL in the shared MCQA format (question, options, answer)")
    sc.add_argument("--limit", type=int, default=None, help="score the first N questions")
    sc.add_argument(
        "--method",
        choices=["uf", "fidelity", "sampled", "token", "verbalized", "linguistic"],
        default="uf",
    )
    sc.add_argument("--mode", choices=["auto", "logprobs", "sampling"], default=None)
    sc.add_argument("--samples", type=int, default=None, help="K in sampling mode")
    sc.add_argument("--concurrency", type=int, default=16, help="questions in flight")
    sc.set_defaults(func=_score)

    model = sub.add_parser("model", help="convert the embedded model (once); print its folder")
    model.add_argument("--cache", default=None, help="default: UFCAL_MODEL_CACHE")
    model.set_defaults(func=_model)

    bench = sub.add_parser(
        "bench", help="throughput and latency: plain answer vs UF vs naive, service overhead"
    )
    bench.add_argument("--n", type=int, default=100, help="questions (default 100)")
    bench.add_argument(
        "--data",
        default="../shared/data/mcqa/arc_challenge_test.jsonl",
        help="MCQA JSONL file (default: ARC-Challenge from ../shared)",
    )
    bench.add_argument(
        "--engine-url", default=None, help="vLLM server(s); default: UFCAL_ENGINE_URL or in-process"
    )
    bench.add_argument(
        "--variants", default="abcd", help="subset of a, b, c, d, e (e: b with --skip-mass)"
    )
    bench.add_argument(
        "--skip-mass", type=float, default=0.1, help="the cost bound of variant e (default 0.1)"
    )
    bench.add_argument("--concurrency", type=int, default=32, help="questions in flight (a-c)")
    bench.add_argument("--samples", type=int, default=10, help="K for c and d")
    bench.add_argument("--out", default="reports/bench.json", help="JSON report path")
    bench.add_argument("--overhead-requests", type=int, default=2000)
    bench.add_argument(
        "--overhead-db-url", default=None, help="also measure the overhead on this database"
    )
    bench.add_argument("--no-overhead", action="store_true", help="skip the service overhead")
    bench.add_argument("--no-engine", action="store_true", help="only the service overhead")
    bench.set_defaults(func=_bench)

    db = sub.add_parser("db", help="the score database: `ufcal db upgrade` runs its migrations")
    db.add_argument("action", choices=["upgrade"], help="upgrade: migrate to the newest schema")
    db.set_defaults(func=_db)

    metrics = sub.add_parser("metrics", help="calibration metrics of a scored JSONL file")
    metrics.add_argument("file", help="JSONL with 'confidence' and 'correct' per line")
    metrics.add_argument("--bins", type=int, default=10, help="number of equal-width bins")
    metrics.set_defaults(func=_metrics)

    from service.evaluation.command import add_eval_arguments

    ev = sub.add_parser(
        "eval", help="calibration of chosen methods over MCQA files: table and diagrams"
    )
    add_eval_arguments(ev)
    ev.set_defaults(func=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ufcal`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
