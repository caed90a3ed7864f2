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
    prompt_ids: np.ndarray, fractions: dict[str, float], seed: int = DEFAULT_SPLIT_SEED,
    keys: np.ndarray | None = None, train: str = "train",
) -> dict[str, np.ndarray]:  # fmt: skip
    """Row indices per split, split by prompt: no prompt contributes rows to two splits.

    Prompts are shuffled with `seed` and cut in the order of `fractions` (which must sum to 1).
    Every stage (stats baselines, training, evaluation) uses this, so their splits agree. With `keys`
    (`TraceSet.prompt_keys`: equal for one prompt recorded under two ids), a row whose prompt an earlier
    split holds leaves the later one (`drop_repeats`), the `train` split counted first: it keeps all its
    rows, and no held-out row is a copy of a trained one.
    """
    prompt_ids, unique, order, cuts = _shuffled(prompt_ids, fractions, seed)
    out = {}
    for (name, _), lo, hi in zip(fractions.items(), cuts[:-1], cuts[1:]):
        chosen = unique[order[lo:hi]]
        out[name] = np.flatnonzero(np.isin(prompt_ids, chosen))
    return out if keys is None else drop_repeats(out, keys, train)


def table_token_rows(table) -> list[np.ndarray]:
    """Each row's token ids of a trace set's Arrow `table`: views of the column's values, cut at its
    offsets (no expert array read)."""
    rows = []
    for chunk in table.column("token_ids").chunks:
        offsets, values = chunk.offsets.to_numpy(), chunk.values.to_numpy()  # offsets index `values`
        rows += [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return rows


def prompt_keys(table) -> np.ndarray:
    """(rows,) int64 of a trace set's Arrow `table`: a hash of each row's first `num_prefill` token ids (the
    whole row where that is 0), read from the offsets and values of its columns, no expert array touched.
    Rows that record one prompt twice, under two prompt ids or in two trace sets, share a key, so a split
    can keep the copies on one side (`split_indices`)."""
    prefill = np.concatenate([c.to_numpy() for c in table.column("num_prefill").chunks]).astype(np.int64)
    keys = np.empty(len(prefill), np.int64)
    for row, toks in enumerate(table_token_rows(table)):
        keys[row] = token_key(toks[: prefill[row] if prefill[row] > 0 else len(toks)])
    return keys


def token_key(token_ids) -> int:
    """The key `prompt_keys` gives a prompt of these token ids: a 64-bit hash of them."""
    import hashlib

    digest = hashlib.blake2b(np.asarray(token_ids, np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def prompt_groups(prompt_ids: np.ndarray, keys: np.ndarray) -> dict[int, int]:
    """{prompt id: the smallest prompt id of the same prompt tokens} for the ids whose prompt an id below
    them repeats (`TraceSet.prompt_keys`): the routing bank keeps every copy of a prompt out of that
    prompt's vote, not only the row under its own id."""
    parent: dict[int, int] = {}  # union-find over prompt ids, joined through shared keys (an id's rows may
    # carry several prompts, so the groups are the connected components, each named by its smallest id)

    def root(a: int) -> int:
        while parent.get(a, a) != a:
            parent[a] = a = parent.get(parent[a], parent[a])
        return a

    first_of: dict[int, int] = {}
    for pid, key in zip(np.asarray(prompt_ids, np.int64).tolist(), np.asarray(keys).tolist()):
        other = first_of.setdefault(key, pid)
        a, b = root(pid), root(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {pid: root(pid) for pid in set(np.asarray(prompt_ids, np.int64).tolist()) if root(pid) != pid}


def check_nonempty(splits: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """`splits` as they are, or a ValueError naming the split left without rows (a small set, or one whose
    held-out prompts all repeat training ones)."""
    for name, rows in splits.items():
        if not len(rows):
            raise ValueError(f"{where}: the {name!r} split has no rows ({sum(map(len, splits.values()))} rows in the "
                             "other splits; held-out rows whose prompt a training row repeats are left out)")
    return splits


def shared_prefix_tokens(held_out, train) -> np.ndarray:
    """(rows of `held_out`,) int64: per held-out row, its longest prefix (in tokens) that some row of `train`
    (TraceSets, or views of one) also starts with. Routing at token t depends on tokens <= t only, so at
    those tokens the held-out routing is one the train rows hold: `drop_repeats` removes whole copies, not
    a prompt that shares its opening with a trained one. Token ids are read from the Arrow columns (no
    expert array); prefixes are matched by a 61-bit polynomial hash. The set holds the held-out rows'
    prefixes, and a train row is read only while it is one of them: memory follows the held-out split,
    however large the train split."""
    mod, base = (1 << 61) - 1, 1_000_003

    def prefixes(toks):  # the hash of each prefix of `toks`, shortest first
        h = 0
        for t in toks.tolist():
            h = (h * base + t + 1) % mod
            yield h

    held = {h for toks in held_out.token_rows() for h in prefixes(toks)}
    seen = set()  # held-out prefixes that some train row starts with
    for toks in train.token_rows():
        for h in prefixes(toks):
            if h not in held:
                break  # no held-out row starts with this prefix, so none with a longer one
            seen.add(h)
    out = np.zeros(len(held_out), np.int64)
    for i, toks in enumerate(held_out.token_rows()):
        for h in prefixes(toks):
            if h not in seen:
                break
            out[i] += 1
    return out


def drop_repeats(splits: dict[str, np.ndarray], keys: np.ndarray, first: str | None = None) -> dict[str, np.ndarray]:
    """`splits` (name -> rows) without the rows whose key a split before theirs holds: `first` (when it is
    one of them) counts first, then the others in order; the dict keeps its order."""
    keys, seen, out = np.asarray(keys), np.empty(0, np.int64), {}
    for name in sorted(splits, key=lambda n: n != first):  # stable: `first`, then the given order
        mine = keys[splits[name]]
        out[name] = splits[name][~np.isin(mine, seen)]
        seen = np.union1d(seen, mine)
    return {name: out[name] for name in splits}


def _shuffled(prompt_ids, fractions: dict[str, float], seed: int):
    """(prompt ids, the distinct prompts, their shuffled order, the cuts of `fractions` in it)."""
    check_fractions(fractions)
    prompt_ids = np.asarray(prompt_ids)
    unique = np.unique(prompt_ids)
    order = np.random.default_rng(seed).permutation(len(unique))
    cuts = np.round(np.cumsum([0.0, *fractions.values()]) * len(unique)).astype(int)
    return prompt_ids, unique, order, cuts


def carve_split(prompt_ids: np.ndarray, fractions: dict[str, float], seed: int, source: str, name: str,
                fraction: float, keys: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """`split_indices`, plus a split `name` of round(fraction x prompts) prompts taken from the end of
    `source`'s share of the shuffled order: every other split keeps exactly its prompts (with `keys`, the
    rows `split_indices` keeps with them, and `name` none whose prompt `source` holds)."""
    prompt_ids, unique, order, cuts = _shuffled(prompt_ids, fractions, seed)
    if source not in fractions or name in fractions:
        raise ValueError(f"carving {name!r} out of {source!r}: {source!r} must be a split and {name!r} not one "
                         f"of {list(fractions)}")  # fmt: skip
    i = list(fractions).index(source)
    lo, hi = cuts[i], cuts[i + 1]
    n = int(round(fraction * len(unique)))
    if not 0 < n < hi - lo:
        raise ValueError(f"carving {name!r} = {fraction} of {len(unique)} prompts ({n}) out of {source!r} "
                         f"({hi - lo} prompts) must leave both non-empty")  # fmt: skip
    out = split_indices(prompt_ids, fractions, seed, keys, source)  # the other splits as without the carving
    carved = np.isin(prompt_ids, unique[order[hi - n : hi]])
    out[source] = out[source][~carved[out[source]]]
    out[name] = np.flatnonzero(carved)
    if keys is not None:  # nor a carved row whose prompt `source` keeps
        keys = np.asarray(keys)
        out[name] = out[name][~np.isin(keys[out[name]], keys[out[source]])]
    return out


def training_splits(prompt_ids: np.ndarray, fractions: dict[str, float], seed: int, train_split: str = "train",
                    calib_fraction: float = 0.0, keys: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The splits a training run uses (the DataModule's, and `fit_reuse_hazard`'s from its file's meta):
    `split_indices`, and with `calib_fraction` > 0 the calibration prompts carved from the train split
    as split "calib" (`carve_split`); `keys` as there."""
    if not calib_fraction:
        return split_indices(prompt_ids, fractions, seed=seed, keys=keys, train=train_split)
    return carve_split(prompt_ids, fractions, seed, train_split, "calib", calib_fraction, keys)


def recorded_splits(prompt_ids: np.ndarray, meta: dict) -> tuple[dict[str, np.ndarray], str]:
    """(the splits, the train split's name) a training run made of these rows, as its predictor file's
    meta records them (`split`, `split_seed`, `train_split`, `calib_fraction`, `max_rows`: it split only
    the first rows); indices are rows of `prompt_ids`."""
    fractions, seed = dict(meta.get("split") or DEFAULT_SPLIT), meta.get("split_seed", DEFAULT_SPLIT_SEED)
    train = meta.get("train_split", "train")
    if train not in fractions:
        raise ValueError(f"the predictor's meta names train split {train!r}, not one of its splits {list(fractions)}")
    ids = np.asarray(prompt_ids)[: meta.get("max_rows")]
    return training_splits(ids, fractions, seed, train, meta.get("calib_fraction") or 0.0), train


def trace_fingerprint(ts) -> str:
    """A trace set's rows by prompt and length (a hash of its prompt-id and length columns), wherever it
    lies: a predictor file records the one it trained on, so evaluation can tell its train prompts."""
    import hashlib

    h = hashlib.sha256(np.asarray(ts.prompt_ids, np.int64).tobytes())
    h.update(np.asarray(ts.lengths, np.int64).tobytes())
    return h.hexdigest()[:16]
