"""UF Calibration (Zhang et al., EMNLP 2024): uncertainty, fidelity chains, fidelity and
confidence as plain functions over plain data. Options are referred to by index."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_TAU = 2.0
DEFAULT_EPS = 0.01


def distribution_from_samples(answers: Sequence[int | None], n_options: int) -> list[float]:
    """P(a) = count(a) / number parsed; ``None`` marks an unparseable sample (dropped).

    Raises ``ValueError`` when nothing parsed: such a question cannot be scored."""
    parsed = [a for a in answers if a is not None]
    if not parsed:
        raise ValueError("no sampled answer named an option")
    counts = [0] * n_options
    for a in parsed:
        counts[a] += 1
    return [c / len(parsed) for c in counts]


def distribution_from_logprobs(logprobs: Sequence[float], temperature: float = 1.0) -> list[float]:
    """P(a) = softmax over the options of logprob(a) / T (``-inf`` gives 0)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    top = max(logprobs)
    if top == -math.inf:
        raise ValueError("no option letter has any probability")
    # Shift before scaling: a tiny T (e.g. 5e-324) would overflow lp / T to -inf for all.
    weights = [math.exp((lp - top) / temperature) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def answer_index(distribution: Sequence[float]) -> int:
    """argmax P; ties go to the earliest option."""
    best = 0
    for i, p in enumerate(distribution):
        if p > distribution[best]:
            best = i
    return best


def uncertainty(distribution: Sequence[float]) -> float:
    """Normalised entropy  -sum P ln P / ln M  in [0, 1] (0 ln 0 = 0)."""
    m = len(distribution)
    if m < 2:
        raise ValueError("uncertainty needs at least two options")
    entropy = -sum(p * math.log(p) for p in distribution if p > 0)
    return min(1.0, max(0.0, entropy / math.log(m)))


def start_set(distribution: Sequence[float], eps: float = 0.0) -> list[int]:
    """Options that start a fidelity chain: P(a) > 0 when ``eps`` is 0 (sampling mode),
    P(a) >= eps otherwise (logprobs mode). Ordered by index. Never empty: when ``eps``
    exceeds every P(a), the answer (argmax) alone starts a chain."""
    if eps <= 0:
        starts = [i for i, p in enumerate(distribution) if p > 0]
    else:
        starts = [i for i, p in enumerate(distribution) if p >= eps]
    return starts or [answer_index(distribution)]


def bounded_start_set(
    distribution: Sequence[float], starts: Sequence[int], skip_mass: float
) -> list[int]:
    """Drop the least likely chain starts while the dropped probability mass, as a share of
    the start set's mass, stays at or under ``skip_mass``. The argmax answer is never
    dropped. With ``skip_mass`` 0 this is ``starts`` unchanged (spec-exact)."""
    if skip_mass <= 0 or len(starts) <= 1:
        return list(starts)
    total = sum(distribution[s] for s in starts)
    keep_always = answer_index(distribution)
    dropped = 0.0
    kept = set(starts)
    for s in sorted(starts, key=lambda i: (distribution[i], -i)):
        if s == keep_always:
            continue
        if dropped + distribution[s] > skip_mass * total:
            break
        dropped += distribution[s]
        kept.discard(s)
    return [s for s in starts if s in kept]


@dataclass
class ChainState:
    """One fidelity chain in progress: ``chain[0]`` is the start option, whose text is
    replaced by "All other options are wrong."; ``removed`` are the options the model
    picked instead (removed from later prompts)."""

    start: int
    n_options: int
    chain: list[int] = field(default_factory=list)
    done: bool = False
    unparsed: bool = False

    def __post_init__(self) -> None:
        if not self.chain:
            self.chain = [self.start]
        if self.n_options < 2:
            self.done = True

    @property
    def removed(self) -> frozenset[int]:
        return frozenset(self.chain[1:])

    def allowed(self) -> list[int]:
        """Options still shown (the start's slot included)."""
        return [i for i in range(self.n_options) if i not in self.removed]

    def advance(self, picked: int | None) -> None:
        """Record the model's pick at this step. Picking the start's slot, an unparseable
        reply (``None``) or a removed option ends the chain."""
        if self.done:
            raise ValueError("chain is already finished")
        if picked is None or picked not in self.allowed():
            self.unparsed = True
            self.done = True
            return
        if picked == self.start:
            self.done = True
            return
        self.chain.append(picked)
        if len(self.allowed()) <= 1:
            self.done = True


def chain_fidelity(chain: Sequence[int], tau: float = DEFAULT_TAU) -> dict[int, float]:
    """Fidelity_c(d) = tau^i(d) / sum_{i=1..n} tau^i, i counted from the right (last is 1)."""
    n = len(chain)
    if n == 0:
        raise ValueError("empty chain")
    if tau <= 0:
        raise ValueError("tau must be > 0")
    weights = [tau ** (n - pos) for pos in range(n)]
    total = sum(weights)
    return {option: w / total for option, w in zip(chain, weights, strict=True)}


def fidelity(
    distribution: Sequence[float],
    chains: Mapping[int, Sequence[int]],
    tau: float = DEFAULT_TAU,
) -> list[float]:
    """F(a) = sum_{s in S} w(s) Fidelity_{c(s)}(a), w(s) = P(s) / sum_{S} P; one value per
    option (0 for options in no chain). ``chains`` maps each start s to its chain."""
    mass = sum(distribution[s] for s in chains)
    if mass <= 0:
        raise ValueError("the chain starts carry no probability")
    result = [0.0] * len(distribution)
    for start, chain in chains.items():
        if not chain or chain[0] != start:
            raise ValueError(f"chain of option {start} must begin with it")
        weight = distribution[start] / mass
        for option, f in chain_fidelity(chain, tau).items():
            result[option] += weight * f
    return result


def confidence(
    uncertainty_value: float, fidelity_value: float, *, use_uncertainty: bool = True
) -> float:
    """(1 - U) * F(answer); the ``fidelity`` ablation drops the (1 - U) factor."""
    factor = 1.0 - uncertainty_value if use_uncertainty else 1.0
    return min(1.0, max(0.0, factor * fidelity_value))
