"""Prompt-level train / held-out splits, the same in every stage (stats, training, evaluation)."""

from __future__ import annotations

import numpy as np

# the split every stage uses unless told otherwise; held-out prompts = "val" of
# split_indices(prompt_ids, DEFAULT_SPLIT, seed=DEFAULT_SPLIT_SEED)
DEFAULT_SPLIT = {"train": 0.8, "val": 0.2}
DEFAULT_SPLIT_SEED = 0


def check_fractions(fractions: dict[str, float]) -> None:
    """Each fraction in [0, 1], summing to 1; the error names the split."""
    if not fractions:
        raise ValueError("split fractions: none given")
    for name, f in fractions.items():
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"split fractions: '{name}' = {f!r} must lie in [0, 1]")
    total = sum(fractions.values())
    if not np.isclose(total, 1.0):
        raise ValueError(f"split fractions {fractions} sum to {total}, not 1")


def split_indices(
    prompt_ids: np.ndarray, fractions: dict[str, float], seed: int = DEFAULT_SPLIT_SEED
) -> dict[str, np.ndarray]:
    """Row indices per split, split by prompt: no prompt contributes rows to two splits.

    Prompts are shuffled with `seed` and cut in the order of `fractions` (which must sum to 1).
    Every stage (stats baselines, training, evaluation) uses this, so their splits agree.
    """
    check_fractions(fractions)
    prompt_ids = np.asarray(prompt_ids)
    unique = np.unique(prompt_ids)
    order = np.random.default_rng(seed).permutation(len(unique))
    cuts = np.round(np.cumsum([0.0, *fractions.values()]) * len(unique)).astype(int)
    out = {}
    for (name, _), lo, hi in zip(fractions.items(), cuts[:-1], cuts[1:]):
        chosen = unique[order[lo:hi]]
        out[name] = np.flatnonzero(np.isin(prompt_ids, chosen))
    return out
