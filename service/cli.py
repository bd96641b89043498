"""``ufcal serve | score | metrics | model | bench | eval | calibrate``.

Every command checks its arguments, input files and settings before it starts an engine,
and fails with a one-line message naming the argument (exit status 2). Every command but
``serve`` writes only its data to stdout (JSON lines, the JSON report, the table) and its
logs (JSON lines), progress and engine output to stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli_args import (
    ArgumentError,
    OneLineParser,
    at_least,
    check_engine_settings,
    fraction,
    input_file,
    load_settings,
    output_dir,
    output_file,
)
from service.evaluation.arguments import METHOD_NAMES, add_eval_arguments

if TYPE_CHECKING:
    from service.api.score.protocol import ScoreRequest
    from service.config import Settings

_LEVELS = ("critical", "error", "warning", "info", "debug")


def _port(text: str) -> int:
    port = at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {port}")
    return port


def _serve(args: argparse.Namespace) -> int:
    from service.recalibration import CalibratorFileError, load_calibrator_files
    from service.server import serve

    settings = load_settings()
    try:  # calibrator files are refused before any engine starts
        load_calibrator_files(settings.calibrator_files())
    except CalibratorFileError as exc:
        raise ArgumentError(f"UFCAL_CALIBRATORS: {exc}") from None
    check_engine_settings(settings)
    return serve(settings, args.host or settings.host, args.port or settings.port)


# -- ufcal score ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scorable:
    """One checked question of ``ufcal score``: its request and the gold index, if given."""

    request: ScoreRequest
    gold: int | None


def _request(args: argparse.Namespace, row_id: str, question: Any, options: Any) -> ScoreRequest:
    from service.api.score.protocol import ScoreRequest

    return ScoreRequest(
        id=row_id,
        question=question,
        options=options,
        method=args.method,
        mode=args.mode,
        samples=args.samples,
    )


def _field_errors(exc: Exception) -> str:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'row'}: {e['msg']}" for e in exc.errors()
    )


def _file_questions(args: argparse.Namespace, path: Path) -> list[_Scorable]:
    """Every question of the file (up to ``--limit``), checked before the engine starts."""
    items: list[_Scorable] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if args.limit is not None and len(items) >= args.limit:
                break
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("expected a JSON object")
                for key in ("question", "options"):
                    if key not in row:
                        raise ValueError(f'missing field "{key}"')
                request = _request(
                    args, str(row.get("id", number)), row["question"], row["options"]
                )
                if request.options is None:
                    raise ValueError(
                        '"options" must be a list: ufcal score takes multiple-choice questions'
                    )
                gold = row.get("answer")
                if gold is not None and (
                    isinstance(gold, bool)
                    or not isinstance(gold, int)
                    or not 0 <= gold < len(request.options)
                ):
                    raise ValueError('"answer" must be the 0-based index of an option')
            except (ValueError, TypeError) as exc:
                raise ArgumentError(f"--file {path}: line {number}: {_field_errors(exc)}") from None
            items.append(_Scorable(request, gold))
    if not items:
        raise ArgumentError(f"--file {path}: no questions")
    return items


def _score_questions(args: argparse.Namespace, settings: Settings) -> list[_Scorable]:
    if args.samples is not None and args.samples > settings.max_samples:
        raise ArgumentError(f"argument --samples: must be <= {settings.max_samples}")
    if args.file:
        if args.question or args.option:
            raise ArgumentError("give --file, or --question with --option, not both")
        return _file_questions(args, input_file(args.file, "--file"))
    if not args.question:
        raise ArgumentError("argument --question: required (or give --file)")
    if not args.option or len(args.option) < 2:
        raise ArgumentError("argument --option: give two or more (one per option, in order)")
    try:
        return [_Scorable(_request(args, "1", args.question, args.option), None)]
    except ValueError as exc:
        raise ArgumentError(_field_errors(exc).replace("options", "--option", 1)) from None


async def _score_all(args: argparse.Namespace, settings: Settings, items: list[_Scorable]) -> int:
    from service.api.score.serving import score_params, to_response
    from service.calibration.prompts import Question
    from service.engines import build_engine
    from service.scoring import Unscorable, score

    engine = await build_engine(settings)
    await engine.start()
    template = settings.prompt_template()

    async def one(item: _Scorable) -> str:
        body = item.request
        question = Question(body.question, tuple(body.options or ()))
        try:
            result = await score(question, engine, score_params(body, settings), template)
        except Unscorable as exc:
            return json.dumps({"id": body.id, "error": str(exc)})
        out = to_response(result, body.id or "").model_dump()
        if item.gold is not None:
            out["gold"] = item.gold
            out["correct"] = result.answer == item.gold
        return json.dumps(out)

    try:
        # Keep several questions in flight so that the engine batches across them,
        # and print in input order.
        queue: list[asyncio.Task[str]] = []
        for item in items:
            queue.append(asyncio.create_task(one(item)))
            if len(queue) >= args.concurrency:
                print(await queue.pop(0), flush=True)
        for task in queue:
            print(await task, flush=True)
    finally:
        await engine.close()
    return 0


def _score(args: argparse.Namespace) -> int:
    settings = load_settings()
    items = _score_questions(args, settings)
    check_engine_settings(settings)
    return asyncio.run(_score_all(args, settings, items))


# -- the other commands --------------------------------------------------------------------


def _metrics(args: argparse.Namespace) -> int:
    from service.evaluation.metrics_file import metrics_command

    input_file(args.file, "FILE")
    return metrics_command(args.file, args.bins)


def _eval(args: argparse.Namespace) -> int:
    from service.evaluation.arguments import check_eval_arguments

    check_eval_arguments(args, load_settings())  # before the numerical code is imported
    from service.evaluation.command import eval_command

    return eval_command(args)


def _calibrate(args: argparse.Namespace) -> int:
    input_file(args.results, "RESULTS")
    output_file(args.out, "--out")
    from service.evaluation.calibrate import calibrate_command

    return calibrate_command(args)


def _model(args: argparse.Namespace) -> int:
    from service.engines.embedded import prepare_embedded_model

    settings = load_settings()
    cache = output_dir(args.cache, "--cache") if args.cache else settings.model_cache
    print(prepare_embedded_model(cache))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from service.bench.cli import bench_command

    if args.no_engine and args.no_overhead:
        raise ArgumentError("--no-engine with --no-overhead leaves nothing to measure")
    bad = sorted(set(args.variants) - set("abcdef"))
    if bad or not args.variants:
        raise ArgumentError(f"argument --variants: letters from abcdef, got {args.variants!r}")
    if args.judge != "engine" and "f" not in args.variants:
        raise ArgumentError("argument --judge: only with variant f (free-form)")
    output_file(args.out, "--out")
    settings = load_settings(**({"engine_url": args.engine_url} if args.engine_url else {}))
    if not args.no_engine:
        input_file(args.data, "--data")
        check_engine_settings(settings, "--engine-url" if args.engine_url else None)
    return bench_command(args, settings)


def _db(args: argparse.Namespace) -> int:
    from service.store.migrate import db_command

    return db_command(args, load_settings())


def build_parser() -> argparse.ArgumentParser:
    """The ``ufcal`` command line."""
    parser = OneLineParser(prog="ufcal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=None, help="default: UFCAL_HOST (127.0.0.1)")
    serve.add_argument("--port", type=_port, default=None, help="default: UFCAL_PORT (8000)")
    serve.set_defaults(func=_serve)

    sc = sub.add_parser("score", help="score questions to JSON lines on stdout")
    sc.add_argument("--question", help="the question text")
    sc.add_argument("--option", action="append", help="an option (repeat, in order)")
    sc.add_argument("--file", help="JSONL in the shared MCQA format (question, options, answer)")
    sc.add_argument("--limit", type=at_least(1), default=None, help="score the first N questions")
    sc.add_argument("--method", choices=METHOD_NAMES, default="uf")
    sc.add_argument("--mode", choices=["auto", "logprobs", "sampling"], default=None)
    sc.add_argument("--samples", type=at_least(1), default=None, help="K in sampling mode")
    sc.add_argument("--concurrency", type=at_least(1), default=16, help="questions in flight")
    sc.set_defaults(func=_score)

    model = sub.add_parser("model", help="convert the embedded model (once); print its folder")
    model.add_argument("--cache", default=None, help="default: UFCAL_MODEL_CACHE")
    model.set_defaults(func=_model)

    bench = sub.add_parser(
        "bench", help="throughput and latency: plain answer vs UF vs naive, service overhead"
    )
    bench.add_argument("--n", type=at_least(1), default=100, help="questions (default 100)")
    bench.add_argument(
        "--data",
        default="../shared/data/mcqa/arc_challenge_test.jsonl",
        help="MCQA JSONL file (default: ARC-Challenge from ../shared)",
    )
    bench.add_argument(
        "--engine-url", default=None, help="vLLM server(s); default: UFCAL_ENGINE_URL or in-process"
    )
    bench.add_argument(
        "--variants",
        default="abcd",
        help="subset of a, b, c, d, e (e: b with --skip-mass), f (free-form UF K=10 beside "
        "b and c: every variant then asks 4-option questions)",
    )
    bench.add_argument(
        "--judge",
        choices=["engine", "exact", "nli"],
        default="engine",
        help="variant f: how sampled answers are grouped beyond exact match (as ufcal eval)",
    )
    bench.add_argument(
        "--skip-mass", type=fraction, default=0.1, help="the cost bound of variant e (default 0.1)"
    )
    bench.add_argument(
        "--concurrency", type=at_least(1), default=32, help="questions in flight (a-c)"
    )
    bench.add_argument("--samples", type=at_least(1), default=10, help="K for c and d")
    bench.add_argument("--out", default="reports/bench.json", help="JSON report path")
    bench.add_argument("--overhead-requests", type=at_least(1), default=2000)
    bench.add_argument(
        "--overhead-db-url", default=None, help="also measure the overhead on this database"
    )
    bench.add_argument("--no-overhead", action="store_true", help="skip the service overhead")
    bench.add_argument("--no-engine", action="store_true", help="only the service overhead")
    bench.add_argument(
        "--sweep",
        default="",
        help="option counts to sweep UF logprobs over, e.g. 2,4,8,13,26 (default: none)",
    )
    bench.add_argument("--sweep-n", type=int, default=16, help="questions per option count")
    bench.set_defaults(func=_bench)

    db = sub.add_parser("db", help="the score database: `ufcal db upgrade` runs its migrations")
    db.add_argument("action", choices=["upgrade"], help="upgrade: migrate to the newest schema")
    db.set_defaults(func=_db)

    metrics = sub.add_parser("metrics", help="calibration metrics of a scored JSONL file")
    metrics.add_argument("file", help="JSONL with 'confidence' and 'correct' per line")
    metrics.add_argument("--bins", type=at_least(1), default=10, help="number of equal-width bins")
    metrics.set_defaults(func=_metrics)

    ev = sub.add_parser(
        "eval", help="calibration of chosen methods over MCQA files: table and diagrams"
    )
    add_eval_arguments(ev)
    ev.set_defaults(func=_eval)

    cal = sub.add_parser(
        "calibrate", help="fit calibrators from a labelled results file; before/after table"
    )
    cal.add_argument("results", help="JSONL with model, method, mode, confidence, correct")
    cal.add_argument(
        "--method", default=None, choices=METHOD_NAMES, help="fit only this method (default: all)"
    )
    cal.add_argument("--out", default="calibrators.json", help="calibrator file to write")
    cal.add_argument("--min-labels", type=at_least(2), default=100, help="no calibrator below")
    cal.add_argument(
        "--min-class", type=at_least(2), default=20, help="nor with fewer right or wrong answers"
    )
    cal.set_defaults(func=_calibrate)
    return parser


def _log_level() -> str:
    """``UFCAL_LOG_LEVEL`` (from the environment or ``.env``), checked."""
    level = load_settings().log_level.strip().lower()
    if level not in _LEVELS:
        raise ArgumentError(f"invalid setting: UFCAL_LOG_LEVEL: one of {', '.join(_LEVELS)}")
    return level


def _run(args: argparse.Namespace) -> int:
    level = _log_level()
    if args.command == "serve":  # logs to stdout (it has no other output)
        return int(args.func(args))
    from service.cli_output import stdout_for_data
    from service.logs import configure_logging

    with stdout_for_data():
        configure_logging(level, stream="stderr")
        return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ufcal`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ArgumentError as exc:
        print(f"ufcal {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
