"""Option letters on the embedded model's real tokenizer (issue 13): every letter A-Z, in
both spellings a letter read asks for ("A" and " A"), is one token, so logprobs mode works
for every option count, and the in-process engine's cap on log-probs per token is sized
for all of them."""

from __future__ import annotations

import asyncio
import string
from pathlib import Path

from service.calibration.prompts import letter_forms
from service.config import Settings
from service.engines.letters import letter_token_ids, max_letter_logprobs


def test_every_letter_is_one_token_of_the_embedded_tokenizer(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    for letter in string.ascii_uppercase:
        for form in letter_forms(letter):
            assert len(encode(form)) == 1, (form, encode(form))
    table = letter_token_ids(list(string.ascii_uppercase), encode)
    ids = [t for forms in table.values() for t in forms]
    assert len(ids) == len(set(ids)) == 52  # two distinct tokens per letter
    assert max_letter_logprobs(26) == 52


def test_the_in_process_cap_is_sized_from_the_largest_option_count(tmp_path: Path) -> None:
    from service.engines import build_engine
    from service.engines.vllm_local import LocalVLLMEngine

    assert max_letter_logprobs(10) == 20  # vLLM's default cap: enough up to 10 options only
    assert max_letter_logprobs(11) == 22
    settings = Settings(_env_file=None, model=str(tmp_path), max_options=13)  # type: ignore[call-arg]
    engine = asyncio.run(build_engine(settings))
    assert isinstance(engine, LocalVLLMEngine)
    assert engine._config.max_options == 13
