"""How many prompt tokens UF in logprobs mode must compute per question, against plain
answering, under vLLM's prefix cache at several KV block sizes: the best b/a throughput
ratio an engine bound by prefill compute can reach, whatever the batching.

It rebuilds every prompt the scorer sends for a question (the letter read, then each chain
step, without duplicates) from the chains of an ``ufcal eval`` results file, tokenizes them
with the model's chat template and counts, prompt after prompt, the tokens that are not in
whole cached blocks (a block is cached once a prompt with the same prefix has been
computed; the prompts of one lockstep step are computed together). Block size 1 is the
ideal cache that vLLM cannot do::

    python -m service.bench.prefix_cache_model /tmp/ufcal-eval/results.jsonl \\
        --data ../shared/data/mcqa/arc_challenge_test.jsonl --n 100
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.calibration.prompts import (
    Prompt,
    PromptTemplate,
    Question,
    all_options,
    chain_options,
    render,
)
from service.config import Settings
from service.engines.embedded import EMBEDDED_MODEL_ID, default_cache_dir
from service.evaluation.data import load_mcqa

Tokenize = Callable[[Prompt], Sequence[int]]


def uf_logprobs_steps(
    question: Question, chains: dict[int, list[int]], template: PromptTemplate
) -> list[list[Prompt]]:
    """The prompts UF sends for one question in logprobs mode, step by step: the letter read,
    then each lockstep chain step (a chain of n options took n - 1 steps that added an
    option, plus the step that picked the start's slot unless no other option was left)."""
    steps: list[list[Prompt]] = [[render(question, all_options(question), template)]]
    asked: set[tuple[int, frozenset[int]]] = set()
    n_options = len(question.options)
    for start, chain in chains.items():
        taken = len(chain) - 1 + (0 if len(chain) == n_options else 1)
        for k in range(taken):
            removed = frozenset(chain[1 : k + 1])
            if (start, removed) in asked:
                continue
            asked.add((start, removed))
            while len(steps) <= k + 1:
                steps.append([])
            shown = chain_options(question, start, removed, template.substitute_text)
            steps[k + 1].append(render(question, shown, template))
    return steps


@dataclass
class PrefixCache:
    """Whole-block prefix caching, as vLLM does it (a prompt's last token is always computed)."""

    block: int
    cached: set[tuple[int, ...]]

    def run_step(self, prompts: Iterable[Sequence[int]]) -> tuple[int, int]:
        """Compute one batch of prompts; (prompt tokens, tokens actually computed)."""
        total = computed = 0
        new: list[tuple[int, ...]] = []
        for tokens in prompts:
            full = len(tokens) // self.block
            hit = 0
            while hit < full and tuple(tokens[: (hit + 1) * self.block]) in self.cached:
                hit += 1
            total += len(tokens)
            computed += len(tokens) - min(hit * self.block, len(tokens) - 1)
            new += [tuple(tokens[: (b + 1) * self.block]) for b in range(full)]
        self.cached.update(new)  # a step's prompts are scheduled together
        return total, computed


def model_cost(
    questions: Sequence[tuple[Question, dict[int, list[int]]]],
    tokenize: Tokenize,
    template: PromptTemplate,
    blocks: Sequence[int] = (1, 16, 32),
) -> list[dict[str, Any]]:
    """Per block size: prompt tokens computed per question, plain answering and UF."""
    tokenized = [
        [[tokenize(p) for p in step] for step in uf_logprobs_steps(q, chains, template)]
        for q, chains in questions
    ]
    rows = []
    for block in blocks:
        plain, uf = PrefixCache(block, set()), PrefixCache(block, set())
        plain_computed = sum(plain.run_step(steps[0])[1] for steps in tokenized)
        uf_computed = sum(uf.run_step(step)[1] for steps in tokenized for step in steps)
        n = len(tokenized)
        rows.append(
            {
                "block": block,
                "plain_computed_per_q": round(plain_computed / n, 1),
                "uf_computed_per_q": round(uf_computed / n, 1),
                "prompts_per_q": round(sum(len(s) for t in tokenized for s in t) / n, 2),
                "b_over_a_bound": round(plain_computed / uf_computed, 3),
            }
        )
    return rows


def load_chains(
    results: Path, data: Path, method: str = "uf", n: int = 100
) -> list[tuple[Question, dict[int, list[int]]]]:
    """The first ``n`` logprobs-mode rows of ``method`` for ``data``'s dataset in an eval
    results file, as (question as shown, chains by option index)."""
    items = {item.id: item for item in load_mcqa(data)}
    dataset = next(iter(items.values())).dataset
    out: list[tuple[Question, dict[int, list[int]]]] = []
    with results.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row.get("dataset") != dataset or row.get("method") != method:
                continue
            if row.get("mode") != "logprobs" or not row.get("chains"):
                continue
            item = items[row["id"]]
            question = Question(item.question, tuple(item.options[i] for i in row["perm"]))
            index = {label: i for i, label in enumerate(question.labels)}
            chains = {index[s]: [index[x] for x in c] for s, c in row["chains"].items()}
            out.append((question, chains))
            if len(out) == n:
                break
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="an `ufcal eval` results JSONL file")
    parser.add_argument("--data", type=Path, required=True, help="the MCQA file it evaluated")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--model-dir", type=Path, help="default: the embedded model's folder")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    settings = Settings()
    template = settings.prompt_template()
    model_dir = args.model_dir or default_cache_dir() / EMBEDDED_MODEL_ID
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def tokenize(prompt: Prompt) -> list[int]:
        if not prompt.chat:
            return list(tokenizer(prompt.text)["input_ids"])
        ids = tokenizer.apply_chat_template(
            prompt.messages(), continue_final_message=True, tokenize=True, return_dict=False
        )
        return list(ids)

    questions = load_chains(args.results, args.data, n=args.n)
    print(json.dumps({"questions": len(questions), "model": str(model_dir)}))
    for row in model_cost(questions, tokenize, template):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
