"""Context windows of trace rows, and the batch they are padded into (the training loader's items).

Windows. A row (one sequence) of n tokens is cut into windows of at most `window` tokens. The first
window starts at the sequence start and scores all its tokens. When a row is longer than `window`,
each later window starts `context` tokens *before* the first token it scores: those context tokens
are read but not scored (mask = False), so every token is scored exactly once and, unless it is
among the first `window` tokens of its row, with at least `context` earlier tokens in view. Early
positions are therefore not always context-free, and short rows are seen whole, from their start.

Only an index of windows (row, start, length, first scored offset) is built up front, from the
Arrow offsets; expert arrays are read from the memory-mapped dataset when a window is fetched.

A batch is the tuple (token_ids (B, T) long, experts (B, T, L, k) long, mask (B, T) bool, sequences (B,)
long): padding has token id -1 and expert id -1; mask marks the tokens to score (real and not
context-only); sequences holds each window's prompt id (a routing bank built from the train split must
not read the prompt it is predicting), then positions (B, T) long: each token's position in its row
(-1 = pad; what the metrics bucket by, and the key of the routing bank's memoised votes). With
`gate_inputs` = G > 0 (a predictor that reads the cross-layer gate's picks) a sixth item gives the first
G gate picks of each token and layer (B, T, L, G) long (-1 = pad).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from predictor.mapped_rows import MappedRows
from predictor.traces import TraceSet


def make_windows(lengths: np.ndarray, rows: np.ndarray, window: int, context: int) -> np.ndarray:
    """(n_windows, 4) int64 array of (row, start, length, first_scored) for the given rows."""
    if window < 1:
        raise ValueError(f"data: key 'window' must be >= 1, got {window}")
    if not 0 <= context < window:
        raise ValueError(f"data: key 'context' must lie in [0, window={window}), got {context}")
    out = []
    for row in rows:
        n = int(lengths[row])
        if n > window and not context:  # its first token would be scored as a sequence's, without the routing before it
            raise ValueError(f"data: key 'context' = 0, but row {row} has {n} tokens, more than window = {window}: "
                             "a later window needs context >= 1 (the token before its first scored one)")
        out.append((row, 0, min(n, window), 0))
        scored_to = min(n, window)
        while scored_to < n:
            start = scored_to - context
            length = min(window, n - start)
            out.append((row, start, length, context))
            scored_to = start + length
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)


class WindowDataset(Dataset):
    """Windows of a memory-mapped TraceSet; item -> (token_ids (n,), experts (n, L, k), scored (n,), pos (n,),
    prompt id, or with `groups` the id the routing bank labels the prompt's copies with). With `unk = (unk_id, rate, seed)` each token id is replaced by unk_id with probability
    `rate`, the same tokens in every epoch (drawn per prompt and position), so the unknown-token
    embedding is trained."""

    def __init__(self, traces: TraceSet, windows: np.ndarray, unk: tuple[int, float, int] | None = None,
                 gate: int = 0, groups: dict[int, int] | None = None):  # fmt: skip
        self.traces = traces
        self.groups = groups or {}  # prompt id -> the id the routing bank labels its prompt with (splits.prompt_groups)
        self.windows = windows
        self.unk = unk
        self.gate = gate  # > 0: also the first `gate` cross-layer gate picks (n, L, gate), after prompt id
        self.rows = MappedRows(traces)  # Arrow slices; releases the mapped pages it touched (mapped_rows.py)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        row, start, length, first = (int(x) for x in self.windows[i])
        tokens, experts, prompt_id = self.rows.read(row)  # one row, memory-mapped
        ids = torch.from_numpy(np.asarray(tokens[start : start + length], dtype=np.int64))
        if self.unk is not None:
            unk_id, rate, seed = self.unk
            drop = np.random.default_rng((seed, prompt_id)).random(start + length)[start:] < rate
            ids[torch.from_numpy(drop)] = unk_id
        experts = torch.from_numpy(np.asarray(experts[start : start + length], dtype=np.int64))
        scored = torch.arange(length) >= first
        positions = torch.arange(start, start + length)
        prompt_id = self.groups.get(prompt_id, prompt_id)
        if self.gate:
            g = self.rows.read_gate(row)[start : start + length, :, : self.gate]
            return ids, experts, scored, positions, prompt_id, torch.from_numpy(np.asarray(g, dtype=np.int64))
        return ids, experts, scored, positions, prompt_id


def unpack(batch) -> tuple:
    """A Collate batch as (ids, experts, mask, sequences, positions, gate): gate None without gate picks."""
    ids, experts, mask, sequences, positions, *gate = batch
    return ids, experts, mask, sequences, positions, gate[0] if gate else None


class Collate:
    """Pad a list of windows to the longest one: ids/experts with -1, mask False."""

    def __call__(self, items):
        B = len(items)
        T = max(len(it[0]) for it in items)
        Lk = items[0][1].shape[1:]
        ids = torch.full((B, T), -1, dtype=torch.long)
        experts = torch.full((B, T, *Lk), -1, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        positions = torch.full((B, T), -1, dtype=torch.long)
        gate = torch.full((B, T, *items[0][5].shape[1:]), -1, dtype=torch.long) if len(items[0]) > 5 else None
        for b, (i, e, s, p, _, *g) in enumerate(items):
            n = len(i)
            ids[b, :n], experts[b, :n], mask[b, :n], positions[b, :n] = i, e, s, p
            if gate is not None:
                gate[b, :n] = g[0]
        sequences = torch.tensor([it[4] for it in items], dtype=torch.long)
        if gate is not None:  # the gate picks, after the positions
            return ids, experts, mask, sequences, positions, gate
        return ids, experts, mask, sequences, positions
