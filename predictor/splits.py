"""Prompt-level train / held-out splits, the same in every stage (stats, training, evaluation)."""

from __future__ import annotations

import numpy as np

DEFAULT_SPLIT = {"train": 0.8, "val": 0.2}  # held-out prompts: "val" of split_indices(..., seed=0)


def split_indices(
    prompt_ids: np.ndarray, fractions: dict[str, float], seed: int = 0
) -> dict[str, np.ndarray]:
    """Row indices per split, split by prompt: no prompt contributes rows to two splits.

    Prompts are shuffled with `seed` and cut in the order of `fractions` (which must sum to 1).
    Every stage (stats baselines, training, evaluation) uses this, so their splits agree.
    """
    total = sum(fractions.values())
    if not np.isclose(total, 1.0):
        raise ValueError(f"split fractions {fractions} sum to {total}, not 1")
    prompt_ids = np.asarray(prompt_ids)
    unique = np.unique(prompt_ids)
    order = np.random.default_rng(seed).permutation(len(unique))
    cuts = np.round(np.cumsum([0.0, *fractions.values()]) * len(unique)).astype(int)
    out = {}
    for (name, _), lo, hi in zip(fractions.items(), cuts[:-1], cuts[1:]):
        chosen = unique[order[lo:hi]]
        out[name] = np.flatnonzero(np.isin(prompt_ids, chosen))
    return out
