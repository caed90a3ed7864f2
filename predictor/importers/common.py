"""What every importer shares: the trace meta from what the source and the command line know, the
choice of the MoE layers among an engine's per-layer arrays, and row checks that name the file and record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from predictor.token_space import tokenizer_space, tokenizer_vocab_size
from predictor.traces import TraceFormatError, TraceMeta, TraceRecord, validate_record


@dataclass
class Model:
    """What the command line (or a file's header) says about the model that produced the routing."""

    tokenizer: str  # the tokenizer whose ids the rows hold: the token space (tokenizer_space)
    source_model: str | None = None  # default: the tokenizer name
    architecture: str | None = None  # default: "unknown"
    num_experts: int | None = None  # routed experts per layer (E)
    num_layers: int | None = None  # decoder layers, dense ones included
    moe_layers: list[int] | None = None  # decoder-layer index of each MoE layer
    vocab_size: int | None = None
    num_shared_experts: int = 0
    recording: dict = field(default_factory=dict)

    def filled(self, **known) -> Model:
        """A copy whose unset fields take the values in `known` (e.g. from a file's header)."""
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key, value in known.items():
            if values.get(key) is None and value is not None:
                values[key] = value
        return Model(**values)


def parse_layers(spec: str) -> list[int]:
    """"1-26" or "0,2,4-7" -> sorted decoder-layer indices. A reversed range ('26-1') or a negative index is an
    error here, not an empty list that fails far from the typo; every other part adds at least one index."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            first, last = -1, -1
        if first < 0 or last < first:
            raise ValueError(f"--moe-layers {spec!r}: {part.strip()!r} is not an index or a low-high range "
                             "(expected indices like '1-26' or '0,2,4-7')")
        out.update(range(first, last + 1))
    return sorted(out)


def choose_layers(model: Model, layers_in_file: int, first: np.ndarray, filler: int, where: str) -> Model:
    """Which of an engine's `layers_in_file` per-layer rows are MoE layers.

    Engines size their routing buffers by the model's decoder layers and leave the rows of dense layers
    at a filler (vLLM 0, SGLang -1); others hold MoE layers only. Given --moe-layers, the file has either
    one row per MoE layer or one per decoder layer. Otherwise, when the file has `num_layers` rows, the
    layers whose every entry in `first` (the first sequence, (T, layers, k)) is the filler are taken as
    dense; rows are checked against that choice as they are read (`select`)."""
    if model.moe_layers is not None:
        moe, n = model.moe_layers, model.num_layers or model.moe_layers[-1] + 1
        if layers_in_file not in (len(moe), n):
            raise TraceFormatError(f"{where}: {layers_in_file} layers per token, but --moe-layers lists "
                                   f"{len(moe)} of {n} decoder layers")
        return model.filled(num_layers=n)
    n = model.num_layers or layers_in_file
    if layers_in_file == n:
        dense = (first == filler).all(axis=(0, 2))
        if dense.all():
            raise TraceFormatError(f"{where}: every layer holds only the filler {filler}: no routing recorded")
        return model.filled(moe_layers=np.flatnonzero(~dense).tolist(), num_layers=n)
    if layers_in_file > n:
        raise TraceFormatError(f"{where}: {layers_in_file} layers per token but the model has {n} layers")
    raise TraceFormatError(f"{where}: {layers_in_file} layers per token of a {n}-layer model: "
                           "say which are the MoE layers with --moe-layers")


def select(experts: np.ndarray, model: Model, filler: int, where: str) -> np.ndarray:
    """(T, layers_in_file, k) -> (T, L, k): the MoE layers' rows; the others must hold only the filler."""
    if experts.shape[1] == len(model.moe_layers):
        return experts
    keep = np.zeros(experts.shape[1], dtype=bool)
    keep[model.moe_layers] = True
    bad = np.flatnonzero(~keep & ~(experts == filler).all(axis=(0, 2)))
    if len(bad):
        raise TraceFormatError(f"{where}: layer {int(bad[0])} holds routing but was taken as dense (MoE layers "
                               f"{model.moe_layers}); set --moe-layers")
    return experts[:, keep]


def trace_meta(model: Model, top_k: int, prompt_source: str, recording: dict) -> TraceMeta:
    """The TraceMeta of an import: the token space is the tokenizer's, as collect.py records it."""
    if model.num_experts is None:
        raise ValueError("--num-experts: the number of routed experts per layer is not in the file; give it")
    moe = model.moe_layers
    return TraceMeta(
        source_model=model.source_model or model.tokenizer,
        architecture=model.architecture or "unknown",
        num_layers=model.num_layers or moe[-1] + 1,
        moe_layers=list(moe),
        num_experts=int(model.num_experts),
        top_k=int(top_k),
        num_shared_experts=model.num_shared_experts,
        # the tokenizer's own size where it can be read here: an id past it is refused by the row checks
        vocab_size=model.vocab_size or tokenizer_vocab_size(model.tokenizer),
        tokenizer=model.tokenizer,
        token_space=tokenizer_space(model.tokenizer),
        prompt_source=prompt_source,
        recording={**model.recording, **recording},
    )


def checked(rec: TraceRecord, meta: TraceMeta, where: str) -> TraceRecord:
    """`rec` after the trace format's row checks, whose errors name `where` (file and line / record)."""
    validate_record(rec, meta, where)
    return rec


FIELDS = ("prompt_id", "token_ids", "experts", "num_prefill")  # the generic format's row


def parse_row(row, where: str) -> TraceRecord:
    """One row of the generic format ({prompt_id, token_ids, experts[T][L][k], num_prefill}; other keys
    are ignored) -> TraceRecord; a clear error naming `where` for anything else."""
    if not isinstance(row, dict):
        raise TraceFormatError(f"{where}: expected an object with keys {list(FIELDS)}, got {type(row).__name__}")
    missing = [k for k in FIELDS if k not in row]
    if missing:
        raise TraceFormatError(f"{where}: missing keys {missing} (a row holds {list(FIELDS)})")
    for key in ("prompt_id", "num_prefill"):
        if not isinstance(row[key], (int, np.integer)) or isinstance(row[key], bool):
            raise TraceFormatError(f"{where}: {key} = {row[key]!r} is not an integer")
    return TraceRecord(prompt_id=int(row["prompt_id"]), token_ids=int_array(row["token_ids"], 1, "token_ids", where),
                       experts=int_array(row["experts"], 3, "experts", where), num_prefill=int(row["num_prefill"]))


def generic_meta(model: Model, first: TraceRecord, source: str, fmt: str) -> TraceMeta:
    """The meta of a generic-format file: its rows hold the MoE layers only (L = experts.shape[1])."""
    n_layers, k = first.experts.shape[1:]
    if model.moe_layers is None and model.num_layers not in (None, n_layers):
        raise TraceFormatError(f"{source}: rows hold {n_layers} MoE layers of a {model.num_layers}-layer model: "
                               "say which with --moe-layers")
    moe = model.moe_layers or list(range(n_layers))
    if len(moe) != n_layers:
        raise TraceFormatError(f"{source}: rows hold {n_layers} MoE layers, --moe-layers lists {len(moe)}")
    return trace_meta(model.filled(moe_layers=moe), k, source, {"engine": fmt, "source": source})


def int_array(value, ndim: int, what: str, where: str) -> np.ndarray:
    """A rectangular integer array of `ndim` dimensions from nested lists (or an array), else a clear error."""
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = None
    if arr is None or arr.dtype == object or arr.ndim != ndim:
        shape = "ragged" if arr is None or arr.dtype == object else f"{arr.ndim}-d"
        raise TraceFormatError(f"{where}: {what} must be a rectangular {ndim}-d list of ints, got {shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TraceFormatError(f"{where}: {what} must hold integers, got {arr.dtype}")
    return arr.astype(np.int64)


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON Lines file; errors name the line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}: line {n}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TraceFormatError(f"{where}: not UTF-8 ({e})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{where}: not a line of JSON ({e})") from None
            if not isinstance(obj, dict):
                raise TraceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def read_generic(path, model: Model, limit: int | None, rows, fmt: str, unit: str):
    """(meta, records) of a generic-format file whose `rows(path)` yields (number, record): the meta
    from its first row, then every row lazily, each checked against it (errors name `unit` and number)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {fmt} file at {path}")
    first = next(rows(path), None)
    if first is None:
        raise TraceFormatError(f"{path}: no rows")
    meta = generic_meta(model, first[1], str(path), fmt.lower())

    def records() -> Iterator[TraceRecord]:
        for i, (n, rec) in enumerate(rows(path)):
            if limit is not None and i >= limit:
                return
            yield checked(rec, meta, f"{path}: {unit} {n} (prompt_id={rec.prompt_id})")

    return meta, records()
