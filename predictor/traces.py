"""The trace format: routed experts per token and MoE layer, stored with HF `datasets`.

One row per sequence (a prompt, plus generated tokens when generation was recorded):

    prompt_id    int64                 which prompt the row came from (splits are by prompt)
    token_ids    list<int32>  (T,)     token ids (the model's tokenizer, or `vocab.json` for imports)
    experts      Array3D (T, L, k)     routed expert ids per token x MoE layer, uint8 (int16 if E > 256)
    weights      Array3D (T, L, k)     gate weights, float16, only when `meta.has_weights`
    gate_ahead   Array3D (T, L, B)     the cross-layer gate's picks (experts dtype), only when `meta.gate_ahead` = B > 0:
                                       MoE layer i's router on the hidden state leaving the decoder layer before it
                                       (integrate/runtime/gate.py), its own top-k first, then the next by affinity
    num_prefill  int32                 tokens [0, num_prefill) are teacher-forced prefill, the rest decode

L counts MoE layers only (`meta.moe_layers` maps them to decoder-layer indices). A trace directory holds
Arrow shards (`Dataset.save_to_disk`, memory-mapped on load) and `trace_meta.json`; writes are atomic and
crash-safe (trace_store.py): a directory that has `trace_meta.json` is always a whole dataset.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_json_atomic
from .hub_traces import resolve_trace_path  # hf://datasets/<owner>/<name>: a trace set on the Hub
from .splits import DEFAULT_SPLIT, prompt_keys, split_indices, table_token_rows  # noqa: F401  (split_indices: imported from here)
from .token_space import default_token_space
from .trace_meta import FORMAT_VERSION, TraceMeta, read_meta_file  # noqa: F401  (imported from here)
from .trace_rows import TOKEN_ID_MAX, TraceFormatError, validate_record  # noqa: F401  (the writer and importers call it here)
from .trace_store import (  # noqa: F401  (tests and other modules use them)
    _ACTIVE,
    HIDDEN_KINDS,
    META_FILE,
    Claim,
    _host,
    _move_into_place,
    _owned_siblings,
    _sibling,
    check_target,
    recover,
)

log = logging.getLogger(__name__)


@dataclass
class TraceRecord:
    prompt_id: int
    token_ids: np.ndarray  # (T,)
    experts: np.ndarray  # (T, L, k)
    num_prefill: int  # tokens [0, num_prefill) are prefill, the rest decode
    weights: np.ndarray | None = None  # (T, L, k)
    gate_ahead: np.ndarray | None = None  # (T, L, B)

    @property
    def num_tokens(self) -> int:
        return int(len(self.token_ids))

    def truncated(self, n: int) -> TraceRecord:
        """The first `n` tokens of this row."""
        w = None if self.weights is None else self.weights[:n]
        g = None if self.gate_ahead is None else self.gate_ahead[:n]
        return TraceRecord(self.prompt_id, self.token_ids[:n], self.experts[:n], min(self.num_prefill, n), w, g)

    @property
    def is_decode(self) -> np.ndarray:  # (T,) bool
        return np.arange(self.num_tokens) >= self.num_prefill


def features(meta: TraceMeta):
    import datasets

    cols = {
        "prompt_id": datasets.Value("int64"),
        "token_ids": datasets.List(datasets.Value("int32")),
        "experts": datasets.Array3D(shape=(None, meta.num_moe_layers, meta.top_k), dtype=meta.expert_dtype),
        "num_prefill": datasets.Value("int32"),
    }
    if meta.has_weights:
        cols["weights"] = datasets.Array3D(shape=(None, meta.num_moe_layers, meta.top_k), dtype="float16")
    if meta.gate_ahead:
        cols["gate_ahead"] = datasets.Array3D(shape=(None, meta.num_moe_layers, meta.gate_ahead), dtype=meta.expert_dtype)
    return datasets.Features(cols)


def record_row(rec: TraceRecord, meta: TraceMeta) -> dict:
    """A checked record as the row stored in Arrow (the column types of the trace format)."""
    row = {"prompt_id": int(rec.prompt_id), "token_ids": np.asarray(rec.token_ids, dtype=np.int32),
           "experts": np.asarray(rec.experts).astype(meta.expert_dtype), "num_prefill": int(rec.num_prefill)}
    if meta.has_weights:
        row["weights"] = np.asarray(rec.weights, dtype=np.float16)
    if meta.gate_ahead:
        row["gate_ahead"] = np.asarray(rec.gate_ahead).astype(meta.expert_dtype)
    return row


def write_traces(
    path: str | Path,
    meta: TraceMeta,
    records: Iterable[TraceRecord],
    *,
    overwrite: bool = False,
    max_shard_size: str = "256MB",
    source: str = "records",
    extra_files: dict[str, object] | None = None,
) -> TraceSet:
    """Validate and write `records` atomically to `path`; returns the loaded TraceSet.

    Rows stream through `Dataset.from_generator`, so the input never has to fit in memory.
    `source` names the input in error messages (e.g. the CSV file a record came from).
    `extra_files` maps file names to JSON-serialisable data written inside the dataset
    directory (e.g. `{"vocab.json": [...]}`), so they appear together with the shards.
    """
    import datasets

    path = Path(path)
    if meta.token_space is None:  # every new trace set names its token space
        meta.token_space = default_token_space(meta.tokenizer, (extra_files or {}).get(meta.vocab_file or ""))
    meta.validate(f"{path}/{META_FILE}")
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = Claim(path)  # from here on our siblings are live: `recover` leaves them alone
    tag, build, tmp, trash = claim.tag, claim.build, claim.tmp, claim.trash
    counts = {"sequences": 0, "tokens": 0}

    def rows() -> Iterator[dict]:
        for i, rec in enumerate(records):
            validate_record(rec, meta, f"{source}: row {i} (prompt_id={rec.prompt_id})")
            counts["sequences"] += 1
            counts["tokens"] += rec.num_tokens
            yield record_row(rec, meta)

    try:
        cause = None
        try:
            ds = datasets.Dataset.from_generator(
                rows, features=features(meta), cache_dir=str(build), fingerprint=f"traces-{tag}"
            )
        except datasets.exceptions.DatasetGenerationError as e:
            # datasets wraps whatever the generator raised (a bad row, a model's or generate()'s error, CUDA
            # out of memory) in one generic error: raise the cause itself, which names the problem
            cause = e.__cause__
            if cause is None:
                raise
        if cause is not None:  # raised outside the handler: its own cause stays chained, datasets' wrapper not
            raise cause
        if counts["sequences"] == 0:
            raise TraceFormatError(f"{source}: no records to write to {path}")
        ds.save_to_disk(str(tmp), max_shard_size=max_shard_size)
        del ds
        meta.num_sequences, meta.num_tokens = counts["sequences"], counts["tokens"]
        for name, data in (extra_files or {}).items():
            write_json_atomic(tmp / name, data)
        # the meta file is written last: its presence marks the dataset as whole
        write_json_atomic(tmp / META_FILE, meta.to_dict())
        _move_into_place(tmp, path, trash, overwrite)
    finally:
        claim.release()
    return load_traces(path, validate=False)  # every row was checked on the way in


class TraceSet:
    """A memory-mapped trace dataset: `meta`, `dataset` (HF Dataset, numpy format) and row helpers."""

    def __init__(self, path: Path, meta: TraceMeta, dataset, _table: dict | None = None, _rows=None):
        self.path, self.meta = path, meta
        self.dataset = dataset.with_format("numpy")
        if _table is None:  # the set as loaded: values over its whole table are computed once, for all views
            _table, _rows = {"data": dataset.data}, _hf_rows(dataset)
        # `datasets` slices the table for a contiguous `select` and maps rows for others: a view's rows of the
        # loaded table are kept here, not read from its internals
        self._table, self._rows = _table, _rows

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"TraceSet({str(self.path)!r}, model={m.source_model!r}, sequences={len(self)}, "
            f"L={m.num_moe_layers}, E={m.num_experts}, k={m.top_k})"
        )

    def record(self, i: int) -> TraceRecord:
        row = self.dataset[int(i)]
        return TraceRecord(
            prompt_id=int(row["prompt_id"]),
            token_ids=row["token_ids"].astype(np.int64),
            experts=row["experts"].astype(np.int64),
            num_prefill=int(row["num_prefill"]),
            weights=row["weights"].astype(np.float32) if "weights" in row else None,
            gate_ahead=row["gate_ahead"].astype(np.int64) if "gate_ahead" in row else None,
        )

    def __iter__(self) -> Iterator[TraceRecord]:
        for i in range(len(self)):
            yield self.record(i)

    def _selected(self, values: np.ndarray) -> np.ndarray:
        """Map values over `self.dataset.data` (a slice of the loaded table, after a contiguous select) to
        this view's rows."""
        rows = _hf_rows(self.dataset)
        return values if rows is None else values[rows]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row, read from the Arrow offsets without touching the expert arrays."""
        col = self.dataset.data.column("token_ids")
        lengths = np.concatenate([np.diff(chunk.offsets.to_numpy()) for chunk in col.chunks])
        return self._selected(lengths.astype(np.int64))

    @property
    def prompt_ids(self) -> np.ndarray:
        return self._selected(self.dataset.data.column("prompt_id").to_numpy())

    @property
    def prompt_keys(self) -> np.ndarray:
        """(rows,) int64: each row's prompt hash (`splits.prompt_keys`), once per table for all its views."""
        keys = self._table.get("keys")
        if keys is None:
            keys = self._table["keys"] = prompt_keys(self._table["data"])
        return keys if self._rows is None else keys[self._rows]

    def token_rows(self) -> list[np.ndarray]:  # each row's token ids, without reading the expert arrays
        rows = self._table.get("rows")
        if rows is None:  # cut once per table, for all its views (a train and a held-out view, say)
            rows = self._table["rows"] = table_token_rows(self._table["data"])
        return rows if self._rows is None else [rows[i] for i in self._rows]

    def vocab(self) -> list[str] | None:
        """Token strings by id, for imported traces whose ids the import assigned."""
        if not self.meta.vocab_file:
            return None
        with open(self.path / self.meta.vocab_file) as f:
            return json.load(f)

    def select(self, indices) -> TraceSet:
        indices = np.asarray(indices)
        if indices.dtype == bool:  # as ints it would select rows 0 and 1
            raise TypeError("TraceSet.select takes row indices, not a mask (np.flatnonzero(mask) gives them)")
        pos = np.arange(len(self))[indices.astype(np.int64).reshape(-1)]  # numpy refuses one out of range
        rows = pos if self._rows is None else self._rows[pos]
        return TraceSet(self.path, self.meta, self.dataset.select(pos), self._table, rows)


def _hf_rows(dataset) -> np.ndarray | None:
    """The rows of `dataset.data` a `select`ed HF dataset shows (None: all, in order)."""
    indices = dataset._indices
    return None if indices is None else indices.column(0).to_numpy()


def missing_trace_set(path: Path, key: str = "") -> FileNotFoundError:
    """The error for a trace path with no set (after `recover`), naming a live or other host's write."""
    left = [e.name for _, e, _ in _owned_siblings(path)]
    note = f" (hidden copies of a write still running or from another host: {left})" if left else ""
    if path.name == "deepseek-v2-lite-puffin" and not left:  # the README's Puffin commands' traces
        note = f" (MoE-Beyond's Puffin traces: `python -m predictor.moebeyond --out {path}` imports them)"
    return FileNotFoundError(f"{key + ': ' if key else ''}no trace dataset at {path}{note}")


def check_trace_path(path: Path, key: str = "") -> Path:
    """`path`, a local trace set's folder: a killed overwrite's set is first moved back from its hidden
    `.old-*` sibling (`recover`); no folder there is `missing_trace_set`'s error, naming `key`."""
    if not path.exists():
        recover(path)
    if not path.is_dir():
        raise missing_trace_set(path, key)
    return path


def load_traces(path: str | Path, validate: bool = True) -> TraceSet:
    """Memory-mapped; files, columns and (`validate`) every row checked by trace_checks.py."""
    from .trace_checks import check_rows, open_dataset

    path = check_trace_path(resolve_trace_path(path))  # a local directory, or hf://datasets/... fetched
    meta_path = path / META_FILE
    if not meta_path.exists():
        if not (path / "state.json").exists():
            raise TraceFormatError(f"{path}: no {META_FILE}: not a trace set (collect.py or python -m "
                                   "predictor.moebeyond writes one)")
        open_dataset(path, None)  # another Arrow dataset: it says what it is instead
        raise TraceFormatError(f"{path}: no {META_FILE}; not a complete trace dataset (an interrupted write?)")
    meta = read_meta_file(meta_path)
    ds = open_dataset(path, meta)
    shape = tuple(ds.features["experts"].shape)
    if shape[1:] != (meta.num_moe_layers, meta.top_k):
        raise TraceFormatError(
            f"{path}: experts column has shape {shape}, meta says (None, {meta.num_moe_layers}, {meta.top_k})"
        )
    if meta.has_weights and "weights" not in ds.features:
        raise TraceFormatError(f"{path}: meta.has_weights is true but there is no 'weights' column")
    if meta.gate_ahead:
        shape = tuple(ds.features["gate_ahead"].shape) if "gate_ahead" in ds.features else None
        if shape is None or shape[1:] != (meta.num_moe_layers, meta.gate_ahead):
            raise TraceFormatError(f"{path}: meta.gate_ahead = {meta.gate_ahead} but the gate_ahead column has shape "
                                   f"{shape}, expected (None, {meta.num_moe_layers}, {meta.gate_ahead})")
    ts = TraceSet(path, meta, ds)
    if validate:
        check_rows(ts)  # first: corrupt Arrow offsets are named as such
    tokens = int(ts.lengths.sum())  # from the Arrow offsets (after check_rows' full validation, if any)
    if meta.num_tokens and tokens != meta.num_tokens:  # the rows' count is checked as the dataset opens
        raise TraceFormatError(f"{path}: {tokens} tokens but {META_FILE} says num_tokens = {meta.num_tokens} "
                               "(a truncated or replaced shard?)")
    return ts


def validate_traces(path: str | Path) -> TraceSet:
    """Load and check every row (what every load does); raises TraceFormatError naming the directory and row."""
    return load_traces(path, validate=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m predictor.traces info|validate PATH`: print metadata, or check every row."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m predictor.traces", description=main.__doc__)
    parser.add_argument("command", choices=["info", "validate"])
    parser.add_argument("path")
    args = parser.parse_args(argv)
    ts = validate_traces(args.path) if args.command == "validate" else load_traces(args.path, validate=False)
    print(json.dumps(ts.meta.to_dict(), indent=2))
    print(f"{ts!r}: {int(ts.lengths.sum())} tokens" + (" (all rows valid)" if args.command == "validate" else ""))


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
