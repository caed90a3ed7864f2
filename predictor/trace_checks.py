"""Checks run when a trace set is loaded: its files, its columns, and every row (vectorised).

`open_dataset` reads a trace directory's Arrow dataset, turning a corrupt `state.json`, a missing,
zero-byte or truncated shard, or a plain HF dataset without our columns into a TraceFormatError
that names the file. `check_rows` runs the checks of `validate_record` (trace_rows.py) over whole Arrow
columns (pyarrow.compute and numpy over the flattened lists, one record batch at a time, memory-mapped),
so loading validates every row in well under a second for 200k tokens (Puffin: 0.2-0.4 s on 2 shared
cores; the per-row loop `validate` used before took 2.0 s); the first bad row's message
comes from `validate_record` itself, so load, `python -m predictor.traces validate` and the writer
say the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import traces
from .traces import TOKEN_ID_MAX, TraceFormatError, TraceMeta

COLUMNS = ("prompt_id", "token_ids", "experts", "num_prefill")


def _shards(path: Path) -> list[Path]:
    """The Arrow shard files `state.json` lists; a clear error for a missing or corrupt state."""
    state_path = path / "state.json"
    if not state_path.is_file():
        raise TraceFormatError(f"{path}: no state.json; not an Arrow dataset written by save_to_disk")
    try:
        state = json.loads(state_path.read_bytes())
        files = [entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TraceFormatError(f"{state_path}: corrupt Arrow dataset state ({type(e).__name__}: {e})") from None
    if not all(isinstance(f, str) for f in files):
        raise TraceFormatError(f"{state_path}: corrupt Arrow dataset state (_data_files: {files})")
    return [path / f for f in files]


MISSING = "missing value"  # a null: its row cannot be read back as numbers (check_rows names it as is)


def _check_shard(shard: Path) -> tuple[int, list[str]]:
    """(rows, column names) of one Arrow stream file; a clear error when it is missing, empty or cut short."""
    import pyarrow as pa

    if not shard.is_file():
        raise TraceFormatError(f"{shard}: shard listed in state.json is missing")
    if shard.stat().st_size == 0:
        raise TraceFormatError(f"{shard}: zero-byte shard (an interrupted copy?)")
    try:  # memory-mapped: reading the batches touches their headers, not the data
        with pa.memory_map(str(shard)) as source:
            reader = pa.ipc.open_stream(source)
            return sum(batch.num_rows for batch in reader), reader.schema.names
    except (OSError, ValueError, pa.ArrowException) as e:  # ValueError: undecodable schema names or metadata
        raise TraceFormatError(f"{shard}: truncated or corrupt Arrow shard ({type(e).__name__}: {e})") from None


def open_dataset(path: Path, meta: TraceMeta | None):
    """`datasets.load_from_disk(path)` with every failure named; `meta` None: the directory has no
    trace_meta.json (then the error says what it is, unless it has our columns)."""
    import datasets
    import pyarrow as pa

    found = [_check_shard(s) for s in _shards(path)]
    rows, names = sum(n for n, _ in found), (found[0][1] if found else [])
    if meta is None:  # our columns without the meta: an interrupted write (the caller says so)
        if set(COLUMNS) <= set(names):
            return None
        raise TraceFormatError(
            f"{path}: no trace_meta.json: a saved Hugging Face dataset ({rows} rows, columns {names}), not a "
            "trace set (write one with collect.py or python -m predictor.moebeyond)"
        )
    if rows == 0:
        raise TraceFormatError(f"{path}: no rows (an empty trace set)")
    info = path / "dataset_info.json"
    if info.is_file():
        try:
            json.loads(info.read_bytes())
        except ValueError as e:
            raise TraceFormatError(f"{info}: not valid JSON ({e})") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise many types; name the directory
        raise TraceFormatError(f"{path}: cannot load the Arrow dataset ({type(e).__name__}: {e})") from e
    if not isinstance(ds, datasets.Dataset):
        raise TraceFormatError(f"{path}: a DatasetDict, not one trace dataset")
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise TraceFormatError(
            f"{path}: missing trace columns {missing} (columns: {ds.column_names}); not a trace set"
        )
    if not isinstance(ds.features["experts"], datasets.Array3D):
        raise TraceFormatError(f"{path}: experts column is {ds.features['experts']}, not Array3D (tokens, L, k)")
    if not np.issubdtype(np.dtype(ds.features["experts"].dtype), np.integer):  # floats would be cut to ids silently
        raise TraceFormatError(f"{path}: experts column holds {ds.features['experts'].dtype}, not integer expert ids "
                               f"(this code writes {meta.expert_dtype} for {meta.num_experts} experts)")  # fmt: skip
    token_type = ds.data.column("token_ids").type
    if not pa.types.is_integer(getattr(token_type, "value_type", token_type)):
        raise TraceFormatError(f"{path}: token_ids column holds {token_type}, not lists of integer ids")
    for name in ("prompt_id", "num_prefill"):  # floats would be cut to ints when read, ids merging silently
        if not pa.types.is_integer(ds.data.column(name).type):
            raise TraceFormatError(f"{path}: {name} column holds {ds.data.column(name).type}, not integers")
    if len(ds) == 0:
        raise TraceFormatError(f"{path}: no rows (an empty trace set)")
    if meta.num_sequences and len(ds) != meta.num_sequences:
        raise TraceFormatError(
            f"{path}: {len(ds)} rows but trace_meta.json says num_sequences = {meta.num_sequences} "
            "(a truncated or replaced shard?)"
        )
    return ds


def _lengths(arr) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)


def _row_of(starts: np.ndarray, index: np.ndarray) -> int | None:
    """The row holding the first flagged element; `starts[r]` = first element of row r (plus a final total)."""
    hits = np.flatnonzero(index)
    return None if not len(hits) else int(np.searchsorted(starts, hits[0], side="right") - 1)


def _duplicates(v: np.ndarray) -> np.ndarray:
    """(N, k) ids -> (N,) bool: some id repeats within the row."""
    k = v.shape[1]
    if k > 8:
        s = np.sort(v, axis=1)
        return (s[:, 1:] == s[:, :-1]).any(1)
    out = np.zeros(len(v), dtype=bool)
    for i in range(k):
        for j in range(i + 1, k):
            out |= v[:, i] == v[:, j]
    return out


def _gate_ahead_problems(g, Tex: np.ndarray, tok_starts: np.ndarray, meta: TraceMeta) -> list[tuple[int, str]]:
    """(row, problem) of the first bad rows of a `gate_ahead` column: (T, L, B) like the experts', ids in range, distinct."""
    L, B, E = meta.num_moe_layers, meta.gate_ahead, meta.num_experts
    per_token = g.flatten()
    per_layer = per_token.flatten()
    bad = _lengths(g) != Tex
    if bad.any() or (_lengths(per_token) != L).any() or (_lengths(per_layer) != B).any():
        row = int(np.flatnonzero(bad)[0]) if bad.any() else _row_of(tok_starts, _lengths(per_token) != L)
        if row is None:
            row = _row_of(tok_starts * L, _lengths(per_layer) != B) or 0
        # the rows before it are whole: their value problems come first
        head = _gate_ahead_problems(g.slice(0, row), Tex[:row], tok_starts[: row + 1], meta) if row else []
        return head + [(row, f"gate_ahead shape != (tokens, {L}, {B})")]
    values = per_layer.flatten().to_numpy(zero_copy_only=False).reshape(-1, B)
    out = []
    for bad, why in ((((values < 0) | (values >= E)).any(1), f"gate_ahead expert id out of range [0, {E})"),
                     (_duplicates(values), "duplicate expert id in gate_ahead")):
        row = _row_of(tok_starts * L, bad)
        if row is not None:
            out.append((row, why))
    return out


def _nested_null_row(arr) -> int | None:
    """The row of list column `arr` (lists of lists ... of values) holding the first null at any depth
    below the row itself, or None."""
    import pyarrow as pa

    starts = []  # per level: element index -> its parent's, through the first element of each parent
    level = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
    while pa.types.is_list(level.type) or pa.types.is_large_list(level.type) or pa.types.is_fixed_size_list(level.type):
        starts.append(np.concatenate([[0], np.cumsum(_lengths(level))]))
        level = level.flatten()
        if level.null_count:
            at = int(np.flatnonzero(level.is_null().to_numpy(zero_copy_only=False))[0])
            for s in reversed(starts):
                at = int(np.searchsorted(s, at, side="right") - 1)
            return at
    return None


def first_bad_row(batch, meta: TraceMeta) -> tuple[int, str] | None:
    """(row within `batch`, problem) of the first row validate_record would refuse, or None."""
    import pyarrow as pa

    L, k, E = meta.num_moe_layers, meta.top_k, meta.num_experts
    cols = {name: batch.column(name) for name in batch.schema.names}
    optional = (("weights",) if meta.has_weights else ()) + (("gate_ahead",) if meta.gate_ahead else ())
    names = [n for n in COLUMNS + optional if n in cols]
    first_null = lambda n: int(np.flatnonzero(cols[n].is_null().to_numpy(zero_copy_only=False))[0])  # noqa: E731
    candidates = [(first_null(n), f"{MISSING} in column {n!r}") for n in names if cols[n].null_count]
    if not candidates:  # a null inside a row's lists (read as NaN, it would pass every range check)
        nested = ((n, _nested_null_row(cols[n])) for n in names)
        candidates = [(row, f"{MISSING} inside column {n!r}") for n, row in nested if row is not None]
    if candidates:  # list lengths of a null row are undefined: stop at the first null
        return min(candidates)
    storage = lambda a: a.storage if isinstance(a, pa.ExtensionArray) else a  # noqa: E731
    ex = storage(cols["experts"])
    T = _lengths(cols["token_ids"])
    Tex = _lengths(ex)
    per_token = ex.flatten()  # list<list<id>> per token
    per_layer = per_token.flatten()  # list<id> per (token, layer)
    tok_starts = np.concatenate([[0], np.cumsum(Tex)])
    flags = {
        "mismatched lengths of token ids and experts": Tex != T,
        "empty sequence": T == 0,
    }
    for why, bad in flags.items():
        if bad.any():
            candidates.append((int(np.flatnonzero(bad)[0]), why))
    Lt = _lengths(per_token)
    row = _row_of(tok_starts, Lt != L)
    if row is not None:
        candidates.append((row, f"ragged layers: a token has experts for {Lt[Lt != L][0]} MoE layers, meta has {L}"))
    Kt = _lengths(per_layer)
    if (Kt != k).any():
        tl = np.concatenate([[0], np.cumsum(Lt)])  # (token, layer) index -> token
        token = int(np.searchsorted(tl, np.flatnonzero(Kt != k)[0], side="right") - 1)
        candidates.append((int(np.searchsorted(tok_starts, token, side="right") - 1),
                           f"wrong k: {Kt[Kt != k][0]} experts per token and layer, meta top_k = {k}"))
    structural = min((r for r, _ in candidates), default=len(batch))
    if structural < len(batch):  # value checks need whole (T, L, k) rows: only those before the first broken one
        head = first_bad_row(batch.slice(0, structural), meta) if structural else None
        return head or min(candidates)
    values = per_layer.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)  # (tokens x L, k)
    slot_starts = tok_starts * L
    row = _row_of(slot_starts, ((values < 0) | (values >= E)).any(1))
    if row is not None:
        candidates.append((row, f"expert id out of range [0, {E})"))
    if k > 1:
        row = _row_of(slot_starts, _duplicates(values))
        if row is not None:
            candidates.append((row, "duplicate expert id"))
    ids = cols["token_ids"].flatten().to_numpy(zero_copy_only=False)
    bad_ids = (ids < 0) | (ids > TOKEN_ID_MAX) if meta.vocab_size is None else (ids < 0) | (ids >= meta.vocab_size)
    row = _row_of(np.concatenate([[0], np.cumsum(T)]), bad_ids)
    if row is not None:
        candidates.append((row, f"token id out of range [0, {meta.vocab_size or TOKEN_ID_MAX + 1})"))
    prefill = cols["num_prefill"].to_numpy(zero_copy_only=False)
    bad = (prefill < 0) | (prefill > T)
    if bad.any():
        candidates.append((int(np.flatnonzero(bad)[0]), "num_prefill outside [0, tokens]"))
    if meta.has_weights:
        w = storage(cols["weights"])
        wt = w.flatten()  # the experts are (T, L, k) here: a level's hits before its first misfit name their row
        rows = [_row_of(np.arange(len(Tex) + 1), _lengths(w) != Tex), _row_of(tok_starts, _lengths(wt) != L),
                _row_of(slot_starts, _lengths(wt.flatten()) != k)]
        row = min((r for r in rows if r is not None), default=None)
        if row is not None:
            candidates.append((row, "weights shape != experts shape"))
    if meta.gate_ahead:
        candidates += _gate_ahead_problems(storage(cols["gate_ahead"]), Tex, tok_starts, meta)
    return min(candidates) if candidates else None


def check_rows(ts) -> None:
    """Raise TraceFormatError naming `ts.path`, the row and the problem of the first bad row of a
    loaded (unselected) TraceSet; every check of validate_record, vectorised per record batch. The
    Arrow files are read with plain reads where they can be (chunks.file_batches), so a load leaves no
    memory-mapped pages of the whole set resident."""
    from .chunks import file_batches

    read = file_batches(ts.dataset)
    whole = ts.dataset.data.table.to_batches() if read is None else read
    start = 0
    for batch in (b.slice(i, 256) for b in whole for i in range(0, b.num_rows, 256)):  # bounded memory on long rows
        try:  # offsets that point outside their buffers would crash the reads below (not raise): checked first
            batch.validate(full=True)
        except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid
            raise TraceFormatError(f"{ts.path}: rows {start}..{start + batch.num_rows - 1}: corrupt Arrow data "
                                   f"({str(e).splitlines()[0]})") from None  # fmt: skip
        found = first_bad_row(batch, ts.meta)
        if found is not None:
            row, why = start + found[0], found[1]
            where = f"{ts.path}: row {row}"
            try:  # the writer's own message for this row, when it can read the row (a null it would read as NaN)
                if not why.startswith(MISSING):
                    traces.validate_record(ts.record(row), ts.meta, where)
            except TraceFormatError:
                raise
            except Exception:  # noqa: BLE001 - a row too broken to decode: our own message below
                pass
            raise TraceFormatError(f"{where}: {why}")
        start += batch.num_rows


def decode_utf8(data: bytes, where: str, error: type[Exception] = ValueError) -> str:
    """`data` as UTF-8 text; otherwise `error` naming `where`, the 1-based line and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{where}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None
