"""What one row of the trace format must satisfy (`validate_record`: the writer's and the importers'
check, run again by every load in vectorised form, trace_checks.py), and the error every check raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .traces import TraceMeta, TraceRecord


class TraceFormatError(ValueError):
    """Bad trace data or metadata; the message names the file, row and problem."""


TOKEN_ID_MAX = int(np.iinfo(np.int32).max)  # the token_ids column is int32


def validate_record(rec: TraceRecord, meta: TraceMeta, where: str) -> None:
    """Raise TraceFormatError naming `where` (file and row) and the first problem found."""
    L, k, E = meta.num_moe_layers, meta.top_k, meta.num_experts
    ex = np.asarray(rec.experts)
    for name, a in (("experts", ex), ("token_ids", np.asarray(rec.token_ids))):
        if a.size and not np.issubdtype(a.dtype, np.integer):  # stored as ints, 2.7 would become 2 silently
            raise TraceFormatError(f"{where}: {name} hold {a.dtype} values, not integer ids")
    if ex.ndim != 3:
        raise TraceFormatError(f"{where}: experts must be (tokens, layers, k), got shape {ex.shape}")
    T = len(rec.token_ids)
    if ex.shape[0] != T:
        raise TraceFormatError(f"{where}: mismatched lengths: {T} token ids but experts for {ex.shape[0]} tokens")
    if T == 0:
        raise TraceFormatError(f"{where}: empty sequence")
    if ex.shape[1] != L:
        raise TraceFormatError(f"{where}: ragged layers: experts for {ex.shape[1]} MoE layers, meta has {L}")
    if ex.shape[2] != k:
        raise TraceFormatError(f"{where}: wrong k: {ex.shape[2]} experts per token and layer, meta top_k = {k}")
    _check_ids(ex, E, where)
    ids = np.asarray(rec.token_ids)
    # negative ids always (-1 is the padding of every batch), and ids past the int32 column, which the
    # cast would wrap to negative ones that every later load refuses
    high = TOKEN_ID_MAX + 1 if meta.vocab_size is None else meta.vocab_size
    bad_ids = (ids < 0) | (ids >= high)
    if bad_ids.any():
        t = int(np.flatnonzero(bad_ids)[0])
        raise TraceFormatError(f"{where}: token id {int(ids[t])} out of range [0, {high}) at token {t}"
                               + (" (int32 token_ids)" if meta.vocab_size is None else ""))
    if not 0 <= rec.num_prefill <= T:
        raise TraceFormatError(f"{where}: num_prefill = {rec.num_prefill} outside [0, {T}]")
    if isinstance(rec.prompt_id, bool) or not isinstance(rec.prompt_id, (int, np.integer)) or not 0 <= rec.prompt_id < 2**63:
        raise TraceFormatError(f"{where}: prompt_id = {rec.prompt_id!r} is not an integer in [0, 2^63) (the int64 column)")
    if meta.has_weights:
        if rec.weights is None:
            raise TraceFormatError(f"{where}: meta.has_weights is true but the row has no gate weights")
        if np.shape(rec.weights) != ex.shape:
            raise TraceFormatError(f"{where}: weights shape {np.shape(rec.weights)} != experts shape {ex.shape}")
    if meta.gate_ahead:
        _check_gate_ahead(rec.gate_ahead, (T, L, meta.gate_ahead), E, where)


def _check_gate_ahead(g, shape: tuple, E: int, where: str) -> None:
    if g is None:
        raise TraceFormatError(f"{where}: meta.gate_ahead = {shape[2]} but the row has no gate_ahead picks")
    g = np.asarray(g)
    if g.shape != shape:
        raise TraceFormatError(f"{where}: gate_ahead shape {g.shape} != (tokens, MoE layers, gate_ahead) {shape}")
    _check_ids(g, E, where, "gate_ahead ")


def _check_ids(ids: np.ndarray, E: int, where: str, name: str = "") -> None:
    """(T, L, n) expert ids: each in [0, E), none twice within a (token, layer); errors name the first."""
    bad = np.argwhere((ids < 0) | (ids >= E))
    if len(bad):
        t, layer, j = bad[0]
        raise TraceFormatError(f"{where}: {name}expert id {int(ids[t, layer, j])} out of range [0, {E}) at token {t}, "
                               f"MoE layer {layer}")  # fmt: skip
    srt = np.sort(ids, axis=-1)
    dup = np.argwhere((srt[..., 1:] == srt[..., :-1]).any(-1))
    if len(dup):
        t, layer = dup[0]
        raise TraceFormatError(f"{where}: duplicate expert id in {name}{ids[t, layer].tolist()} at token {t}, "
                               f"MoE layer {layer}")  # fmt: skip
