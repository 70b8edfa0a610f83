"""Dropout RNG for tensor parallelism: named generator states swapped in for a block (Megatron's RNG tracker).

Activations that differ between tensor-parallel ranks (a shard of heads, a shard of the sequence) draw their dropout
masks from a per-rank generator (``get_rng_tracker().fork()``); replicated activations use the default generator,
seeded alike on every rank so that they stay identical. :func:`tensor_parallel_manual_seed` seeds both.
"""

from __future__ import annotations

import contextlib

import torch

from labs_lib.parallel.comms import group_rank

TP_RNG = "tensor-parallel"




class RNGStatesTracker:
    """Named RNG states. ``fork(name)`` runs a block on that state, keeps where it got to, restores the default."""

    def __init__(self):
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def reset(self) -> None:
        self.states.clear()

    @staticmethod
    def _get() -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    @staticmethod
    def _set(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def add(self, name: str, seed: int) -> None:
        default = self._get()
        torch.manual_seed(seed)
        self.states[name] = self._get()
        self._set(default)

    @contextlib.contextmanager
    def fork(self, name: str = TP_RNG):
        if name not in self.states:
            raise RuntimeError(f"RNG state {name!r} was never seeded: call tensor_parallel_manual_seed(seed) first")
        default = self._get()
        self._set(self.states[name])
        try:
            yield
        finally:
            self.states[name] = self._get()
            self._set(default)


_tracker = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _tracker


def tensor_parallel_manual_seed(seed: int, group=None) -> None:
    """Default generator: ``seed`` on every rank (replicated dropout agrees); tracker: one seed per TP rank."""
    torch.manual_seed(seed)
    _tracker.reset()
    _tracker.add(TP_RNG, seed + 2718 + group_rank(group))  # Megatron's offset: rank 0's stream != the default
