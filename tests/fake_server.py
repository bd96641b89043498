"""``ufcal serve`` over the scriptable fake engine, as a real uvicorn process (the same
``run_server`` as the CLI: signals, graceful shutdown, exit codes).

    python -m tests.fake_server --port 8501 [--delay 0.2] [--die-after 3]

``UFCAL_*`` settings apply as usual. ``--delay`` is the time of every engine call (a /score
is 4 calls); ``--die-after`` makes the engine die that many seconds after it started, like
an in-process vLLM whose engine core crashed: calls then fail and ``dead`` turns true."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from service.api.app import create_app
from service.calibration.prompts import Prompt
from service.config import Settings
from service.engines.base import EngineUnavailable, GenerationParams
from service.logs import configure_logging
from service.server import run_server
from tests.fakes import FakeCall, FakeEngine


def letters(prompt: Prompt, labels: Sequence[str]) -> dict[str, float]:
    """Any question, any labels: the earlier a label, the likelier (finite log-probs)."""
    return {label: -1.0 - 0.5 * i for i, label in enumerate(labels)}


def generate(prompt: Prompt, params: GenerationParams) -> list[str]:
    """Sampling: every reply names the first option (or the first allowed choice)."""
    reply = params.choices[0] if params.choices else " A"
    return [reply] * params.n


class FakeServerEngine(FakeEngine):
    """A plausible model for any question; dies on request."""

    def __init__(self, delay: float, die_after: float | None) -> None:
        super().__init__(letters=letters, generate=generate, delay=delay, fail=self._failure)
        self.die_after = die_after
        self.started_at = 0.0

    async def start(self) -> None:
        await super().start()
        self.started_at = time.monotonic()

    @property
    def dead(self) -> bool:
        return self.die_after is not None and time.monotonic() - self.started_at >= self.die_after

    def _failure(self, call: FakeCall) -> BaseException | None:
        return EngineUnavailable("the fake engine core died") if self.dead else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--die-after", type=float, default=None)
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings.log_level)
    engine = FakeServerEngine(args.delay, args.die_after)
    return run_server(create_app(settings, engine=engine), settings, "127.0.0.1", args.port)


if __name__ == "__main__":
    sys.exit(main())
