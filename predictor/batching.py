"""Batches of windows by token budget: length-sorted, greedily packed to at most `batch_tokens` padded
tokens (and `max_batch_size` windows), so short prompts are not padded to the window. The batches are
fixed once; each training epoch shuffles their order (seeded by (seed, epoch), the same on every rank),
and under DDP each rank takes every world_size-th batch. A mid-epoch checkpoint resumes the epoch's
order without its finished batches (resume.py)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Sampler


class TokenBudgetBatchSampler(Sampler):
    """Length-sorted batches of at most `batch_tokens` padded tokens; epoch-shuffled order; rank-sharded."""

    def __init__(
        self,
        lengths: np.ndarray,
        batch_tokens: int,
        max_batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_uneven: bool = True,
    ):
        order = np.argsort(-lengths, kind="stable")  # longest first
        batches, cur, cur_max = [], [], 0
        for i in order:
            n = int(lengths[i])
            new_max = max(cur_max, n)
            if cur and (new_max * (len(cur) + 1) > batch_tokens or len(cur) >= max_batch_size):
                batches.append(cur)
                cur, new_max = [], n
            cur.append(int(i))
            cur_max = new_max
        if cur:
            batches.append(cur)
        self.batches = batches
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.drop_uneven = drop_uneven
        # Lightning's _set_sampler_epoch calls set_epoch on `batch_sampler.sampler` only: so it finds ours
        self.sampler = self
        self.started: tuple[int, int] | None = None  # (epoch, batches skipped) of the running iteration
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, done: int) -> None:
        """The next iteration is epoch `epoch` without its first `done` batches (a mid-epoch checkpoint)."""
        self.epoch, self._resume = epoch, (epoch, done)

    @staticmethod
    def _world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _plan(self) -> list[list[int]]:
        order = np.arange(len(self.batches))
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.batches))
        rank, world = self._world()
        if world > 1:
            if self.drop_uneven and len(order) < world:  # a rank without a batch would wait on the others for ever
                raise ValueError(f"{len(order)} training batches for {world} ranks: every rank needs one (a smaller "
                                 "data.batch_tokens, more train prompts, or fewer devices)")
            n = (len(order) // world) * world if self.drop_uneven else len(order)
            order = order[:n][rank::world]
        return [self.batches[i] for i in order]

    def __iter__(self):  # a generator: the order is drawn at the first batch, after Lightning's set_epoch
        epoch, plan = self.epoch, self._plan()
        skip = self._resume[1] if self._resume and self._resume[0] == epoch else 0
        self.started, self._resume = (epoch, skip), None
        if self.shuffle:
            self.epoch += 1  # reshuffle next time even if nobody calls set_epoch
        yield from plan[skip:]

    def __len__(self) -> int:
        rank, world = self._world()
        if world == 1:
            return len(self.batches)
        n = len(self.batches)
        return n // world if self.drop_uneven else math.ceil((n - rank) / world)
