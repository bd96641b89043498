"""JSON log set-up (service.logs): the dictConfig vLLM applies in its processes, warnings,
torch's loggers and the process field. Subprocesses, so the test's own logging is untouched."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from service.logs import JsonFormatter, vllm_logging_config
from tests.servers import ROOT


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _run_script(path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a script (it may start processes, which ``-c`` code cannot)."""
    path.write_text(source)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}
    return subprocess.run(
        [sys.executable, str(path)],
        env={**clean, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_the_vllm_config_is_a_dictconfig_with_the_json_formatter() -> None:
    config = vllm_logging_config("INFO", "stderr")
    handler = config["handlers"]["ufcal_json"]
    assert handler["()"] == "service.logs.json_stream_handler"
    assert handler["stream"] == "ext://sys.stderr"
    assert config["disable_existing_loggers"] is False
    assert config["loggers"]["vllm"] == {"handlers": [], "propagate": True, "level": "INFO"}
    assert config["root"]["handlers"] == ["ufcal_json"]
    json.dumps(config)  # vLLM reads it from a JSON file


def test_configure_logging_points_vllm_at_a_json_config_before_it_is_imported() -> None:
    done = _run(
        """
        import json, os, sys
        from service.logs import configure_logging
        configure_logging("info", stream="stderr")
        path = os.environ["VLLM_LOGGING_CONFIG_PATH"]
        print(json.dumps({"path": path, "stream": os.environ["VLLM_LOGGING_STREAM"],
                          "config": json.load(open(path)), "vllm": "vllm" in sys.modules}))
        """
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["stream"] == "ext://sys.stderr" and out["vllm"] is False
    assert out["config"]["root"]["level"] == "INFO"
    assert not os.path.exists(out["path"])  # removed when the process ended


def test_an_operators_own_vllm_config_wins() -> None:
    done = _run(
        """
        import os
        from service.logs import configure_logging
        configure_logging("info")
        print(os.environ["VLLM_LOGGING_CONFIG_PATH"])
        """,
        VLLM_LOGGING_CONFIG_PATH="/etc/mine.json",
    )
    assert done.stdout.strip() == "/etc/mine.json"


CHILD_SCRIPT = """
import json, logging, logging.config, multiprocessing, os, sys, warnings
import torch  # gives torch's loggers plain-text handlers of their own


def child():
    logging.captureWarnings(False)  # as in a fresh (spawned) process
    logging.getLogger().handlers.clear()
    # what vLLM does in each process it starts: apply the file it was pointed at
    with open(os.environ["VLLM_LOGGING_CONFIG_PATH"]) as handle:
        logging.config.dictConfig(json.load(handle))
    logging.getLogger("vllm.v1.engine.core").info("engine line\\nsecond line")
    logging.getLogger("torch._dynamo").warning("a torch line")
    logging.getLogger("torch._library.triton").warning("another torch line")
    warnings.warn("a python warning", UserWarning)
    sys.stdout.flush()


if __name__ == "__main__":
    from service.logs import configure_logging

    configure_logging("info", stream="stdout")
    process = multiprocessing.get_context("fork").Process(target=child, name="EngineCore")
    process.start()
    process.join()
    sys.exit(process.exitcode)
"""


def test_a_process_configured_by_the_file_writes_json_only(tmp_path: Path) -> None:
    """An engine-core or worker process applies the dictConfig vLLM read from the file;
    then vLLM's, torch's and Python's warning lines are all one JSON object each."""
    done = _run_script(tmp_path / "child.py", CHILD_SCRIPT)
    assert done.returncode == 0, done.stderr
    lines = _json_lines(done.stdout)
    by_logger = {line["logger"]: line for line in lines}
    assert by_logger["vllm.v1.engine.core"]["message"] == "engine line\nsecond line"
    assert by_logger["vllm.v1.engine.core"]["process"] == "EngineCore"
    assert by_logger["torch._dynamo"]["message"] == "a torch line"
    assert by_logger["torch._library.triton"]["level"] == "WARNING"
    assert "a python warning" in str(by_logger["py.warnings"]["message"])
    assert len(lines) == 4
    assert done.stderr == ""


def test_engine_process_lines_name_their_process() -> None:
    record = logging.LogRecord("vllm.x", logging.INFO, __file__, 1, "up", None, None)
    record.processName = "MainProcess"
    assert "process" not in json.loads(JsonFormatter().format(record))
    record.vllm_process_name = "EngineCore"
    out = json.loads(JsonFormatter().format(record))
    assert out["process"] == "EngineCore" and out["pid"] == record.process
    record.msg = "two\nlines"
    assert "\n" not in JsonFormatter().format(record)


LEAKING_CHILD = """
import multiprocessing, os
from multiprocessing import shared_memory

from service.logs import configure_logging


def leak():  # what a vLLM process whose shutdown was forced leaves behind
    shared_memory.SharedMemory(create=True, size=64)
    os._exit(0)


if __name__ == "__main__":
    configure_logging("INFO", "stderr")
    process = multiprocessing.get_context("spawn").Process(target=leak)
    process.start()
    process.join()
"""


def test_the_resource_trackers_exit_warning_is_not_printed(tmp_path: Path) -> None:
    """multiprocessing's resource tracker (a bare interpreter no logging hook reaches) gets
    ufcal's warnings filter, so its plain-text leak warning at exit is not printed (the
    tracker still removes what was leaked)."""
    done = _run_script(tmp_path / "leaking.py", LEAKING_CHILD)
    assert done.returncode == 0, done.stderr
    assert "resource_tracker" not in done.stderr, done.stderr
    assert all(line.startswith("{") for line in done.stderr.splitlines()), done.stderr
