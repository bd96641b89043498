"""Checks of the command line, run before any engine starts (a bad call fails at once).

Argument types for ``argparse`` (so an error names its argument), checks of input and output
paths, and the one-line message of an invalid ``UFCAL_*`` setting."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from pydantic import ValidationError

    from service.config import Settings

__all__ = [
    "ArgumentError",
    "OneLineParser",
    "at_least",
    "check_engine_settings",
    "fraction",
    "input_file",
    "load_settings",
    "output_dir",
    "output_file",
    "settings_error",
]


class ArgumentError(Exception):
    """A bad argument found after parsing (a missing file, a bad combination): the message
    names the argument; ``main`` prints it on one line and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` with a one-line error (no usage block): ``ufcal score: error: argument
    --limit: ... (see ufcal score --help)``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(low: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def fraction(text: str) -> float:
    """An ``argparse`` type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def input_file(path: str | Path, argument: str) -> Path:
    """``path`` as a readable regular file, else :class:`ArgumentError` naming ``argument``."""
    p = Path(path)
    if not p.exists():
        raise ArgumentError(f"{argument}: no such file: {p}")
    if not p.is_file():
        raise ArgumentError(f"{argument}: not a file: {p}")
    if not os.access(p, os.R_OK):
        raise ArgumentError(f"{argument}: cannot read {p}")
    return p


def output_dir(path: str | Path, argument: str) -> Path:
    """``path`` as a folder that exists or can be made (its nearest existing parent is a
    writable folder), else :class:`ArgumentError`. Nothing is created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ArgumentError(f"{argument}: not a folder: {p}")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ArgumentError(f"{argument}: cannot make {p}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ArgumentError(f"{argument}: cannot write in {probe}")
    return p


def output_file(path: str | Path, argument: str) -> Path:
    """``path`` as a file that can be written (or appended to), else :class:`ArgumentError`."""
    p = Path(path)
    if p.is_dir():
        raise ArgumentError(f"{argument}: is a folder: {p}")
    if p.exists() and not os.access(p, os.W_OK):
        raise ArgumentError(f"{argument}: cannot write {p}")
    output_dir(p.parent if str(p.parent) else ".", argument)
    return p


def settings_error(exc: ValidationError) -> str:
    """The errors of an invalid ``Settings()`` on one line, each naming its variable."""
    parts = []
    for error in exc.errors():
        loc: tuple[Any, ...] = tuple(error.get("loc", ()))
        name = "UFCAL_" + str(loc[0]).upper() if loc else "settings"
        parts.append(f"{name}: {error.get('msg', 'invalid')}")
    return "invalid setting: " + "; ".join(parts)


def load_settings(**overrides: Any) -> Settings:
    """``Settings()`` from the environment, or :class:`ArgumentError` naming the bad
    variable."""
    from pydantic import ValidationError

    from service.config import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ArgumentError(settings_error(exc)) from None


def check_engine_settings(settings: Settings, argument: str | None = None) -> None:
    """What the engine needs, checked before it is built: well-formed engine URLs, or for
    the in-process engine vLLM itself and the model (a local folder, or the embedded one)."""
    import importlib.util
    from urllib.parse import urlsplit

    if settings.engine_urls:
        name = argument or "UFCAL_ENGINE_URL"
        for url in settings.engine_urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ArgumentError(f"{name}: expected http(s)://host[:port], got {url!r}")
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ArgumentError(f"{name}: bad port in {url!r}") from None
        return
    if importlib.util.find_spec("vllm") is None:
        raise ArgumentError(
            "the in-process engine needs vLLM (pip install 'ufcal[cpu]' or 'ufcal[gpu]'), "
            "or set UFCAL_ENGINE_URL"
        )
    if settings.model:
        path = Path(settings.model).expanduser()
        looks_local = path.is_absolute() or settings.model.startswith((".", "~"))
        if looks_local and not path.is_dir():
            raise ArgumentError(f"UFCAL_MODEL: no such model folder: {settings.model}")
        return
    from service.engines.embedded import EMBEDDED_MODEL_ID, embedded_gguf_path, is_prepared

    if not is_prepared(settings.model_cache / EMBEDDED_MODEL_ID):
        try:
            embedded_gguf_path()
        except FileNotFoundError as exc:
            raise ArgumentError(f"embedded model: {exc}") from None
