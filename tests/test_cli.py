"""Fail fast: every command checks its arguments, input files, output paths and settings
before it starts an engine, and a bad call exits 2 with one line naming the argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service import cli
from service.evaluation.arguments import METHOD_NAMES
from service.scoring import METHODS
from tests.servers import ROOT


def _mcqa(path: Path, n: int = 3) -> Path:
    rows = [
        {"id": str(i), "question": f"q{i}?", "options": ["a", "b", "c"], "answer": i % 3}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question": "q", "options": ["a", "b"]}\n{"question": "q", "options": ["a"]}\n'
    )
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    return {
        "good": str(_mcqa(tmp_path / "good.jsonl")),
        "bad": str(bad),
        "missing": str(tmp_path / "missing.jsonl"),
        "file": str(not_dir),
        "dir": str(tmp_path),
    }


# (argv, environment, what the one-line message must name)
CASES: list[tuple[list[str], dict[str, str], str]] = [
    (["score"], {}, "--question"),
    (["score", "--question", "q", "--option", "a"], {}, "--option"),
    (["score", "--question", "q", "--option", "a", "--option", " "], {}, "--option"),
    (["score", "--file", "{missing}"], {}, "--file"),
    (["score", "--file", "{bad}"], {}, "line 2: options"),
    (["score", "--file", "{good}", "--question", "q"], {}, "not both"),
    (["score", "--file", "{good}", "--limit", "0"], {}, "--limit"),
    (["score", "--file", "{good}", "--concurrency", "x"], {}, "--concurrency"),
    (["score", "--file", "{good}", "--samples", "65"], {}, "--samples"),
    (["score", "--file", "{good}"], {"UFCAL_SAMPLES": "0"}, "UFCAL_SAMPLES"),
    (["score", "--file", "{good}"], {"UFCAL_ENGINE_URL": "ftp://x"}, "UFCAL_ENGINE_URL"),
    (["score", "--file", "{good}"], {"UFCAL_MODEL": "/no/such/model"}, "UFCAL_MODEL"),
    (["score", "--file", "{good}"], {"UFCAL_LOG_LEVEL": "loud"}, "UFCAL_LOG_LEVEL"),
    (["serve", "--port", "70000"], {}, "--port"),
    (["serve"], {"UFCAL_MODEL": "/no/such/model"}, "UFCAL_MODEL"),
    (["serve"], {"UFCAL_PORT": "0"}, "UFCAL_PORT"),
    (["eval", "missing.jsonl", "--data-dir", "{dir}"], {}, "FILES"),
    (["eval", "{bad}"], {}, "FILES"),
    (["eval", "{good}", "--methods", "uf,nope"], {}, "--methods"),
    (["eval", "{good}", "--notes", "{missing}"], {}, "--notes"),
    (["eval", "{good}", "--figures", "{file}"], {}, "--figures"),
    (["eval", "{good}", "--out", "{dir}"], {}, "--out"),
    (["eval", "{good}", "--limit", "-1"], {}, "--limit"),
    (["eval", "arithmetic", "--freeform", "--levels", "add1,nope"], {}, "--levels"),
    (["eval", "arithmetic", "--freeform", "--per-level", "0"], {}, "--per-level"),
    (["eval", "{good}", "--judge", "exact"], {}, "--judge"),
    (["eval", "arithmetic"], {}, "FILES"),
    (["bench", "--variants", "xyz"], {}, "--variants"),
    (["bench", "--data", "{missing}"], {}, "--data"),
    (["bench", "--no-engine", "--no-overhead"], {}, "--no-engine"),
    (["bench", "--skip-mass", "1.5"], {}, "--skip-mass"),
    (["bench", "--judge", "exact", "--no-engine"], {}, "--judge"),
    (["bench", "--out", "{dir}", "--no-engine"], {}, "--out"),
    (["bench", "--data", "{good}", "--engine-url", "localhost:8000"], {}, "--engine-url"),
    (["metrics", "{missing}"], {}, "FILE"),
    (["metrics", "{good}", "--bins", "0"], {}, "--bins"),
    (["model", "--cache", "{file}"], {}, "--cache"),
]


@pytest.mark.parametrize(("argv", "env", "named"), CASES)
def test_a_bad_call_fails_at_once_naming_the_argument(
    argv: list[str],
    env: dict[str, str],
    named: str,
    files: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_engine(*_: object) -> None:
        raise AssertionError("an engine was built for a bad call")

    monkeypatch.setattr("service.engines.build_engine", no_engine)
    monkeypatch.setattr("service.logs.configure_logging", lambda *a, **k: None)
    for key in [k for k in os.environ if k.startswith("UFCAL_") and k != "UFCAL_DB_PATH"]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exited:
        sys.exit(cli.main([a.format(**files) for a in argv]))
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ufcal") and named in err, err


def test_a_bad_call_of_the_real_command_takes_well_under_an_engine_start(
    files: dict[str, str],
) -> None:
    """As a user runs it: exit 2, one line, nothing on stdout, no engine (which takes tens
    of seconds to start here). The time is printed; the target is 2 s on an idle machine."""
    for argv in (
        ["score", "--question", "q", "--option", "a"],
        ["score", "--file", files["missing"]],
        ["eval", files["good"], "--notes", files["missing"]],
    ):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        elapsed = time.perf_counter() - started
        print(f"{' '.join(argv[:2])}: {elapsed:.2f} s")
        assert done.returncode == 2 and done.stdout == ""
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert elapsed < 10.0  # an engine start takes far longer


def test_eval_and_score_offer_the_scorers_methods() -> None:
    assert METHOD_NAMES == METHODS
