"""`Context`: what the user supplies to a run. Read-only for passes; no global session."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeconv.errors import ConfigError

# Seeds reach torch.Generator (64-bit) and numpy-style generators (32-bit): one range for all.
SEED_MAX = 2**32 - 1


def check_seed(seed) -> int:
    """`seed` as an int in [0, SEED_MAX], or a `ConfigError` naming the range."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed must be an integer from 0 to {SEED_MAX}, not {str(seed)[:40]}")
    return seed


@dataclass(frozen=True)
class Context:
    """Calibration batches, example inputs for promise checks, device, seed, progress callback.

    `calibration` is a (batches, seq) int64 tensor of token ids or None. `example_inputs` are the
    token ids every pass's numerical promise is checked on; by default random ids from `seed`.
    """

    calibration: torch.Tensor | None = None
    example_inputs: torch.Tensor | None = None
    device: str = "cpu"
    seed: int = 0
    progress: object | None = field(default=None, compare=False)  # callable(task, done, total)
    # Held-out (batches, seq) token ids for lossy passes to report perplexity on (`--eval FILE`);
    # disjoint from `calibration`, never used to fit anything.
    evaluation: torch.Tensor | None = field(default=None, compare=False)
    # A streamed sweep's bound on the calibration hidden states it caches (and the passes' own
    # copies of them): a `moeconv.stream.activations.ActivationBudget`, None for no bound.
    activations: object | None = field(default=None, compare=False)

    def hidden_store(self):
        """A store for per-batch hidden states: within `activations` when it is set, else unbounded."""
        from moeconv.stream.activations import HiddenStates
        return self.activations.store() if self.activations is not None else HiddenStates()

    def __post_init__(self):
        check_seed(self.seed)

    def facts(self) -> set[str]:
        return {"calibration"} if self.calibration is not None else set()

    def examples_for(self, vocab_size: int, *, batch: int = 2, seq: int = 16) -> torch.Tensor:
        if self.example_inputs is not None:
            return self.example_inputs
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, vocab_size, (batch, seq), generator=gen)

    def report_progress(self, task: str, done: int, total: int, detail: str | None = None) -> None:
        """`detail`: what the task is doing now (the current pass, bytes written), shown beside it."""
        if self.progress is None:
            return
        if detail is None:  # callbacks written for (task, done, total) keep working
            self.progress(task, done, total)
        else:
            self.progress(task, done, total, detail=detail)
