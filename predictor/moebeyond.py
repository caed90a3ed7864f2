"""Import MoE-Beyond CSV traces (DeepSeek-V2-Lite on Puffin) into the trace format.

    python -m predictor.moebeyond [--src DIR_OR_TAR] [--out DIR] [--limit N] [--overwrite] [--vocab VOCAB_JSON]

The archive `csv.tar.xz` holds `csv/prompt_<id>_data.csv`, one file per prompt, with the header
`Layer ID,Batch Number,Token,Activated Expert IDs`; rows are layer-major (all tokens of MoE layer
1, then layer 2, ...). It is read straight from the compressed stream, never unpacked to disk.
Token strings get ids in order of first appearance over prompts sorted by id, then `<unk>`, saved as
`vocab.json` (a list of strings, index = id) inside the output directory; the trace meta records the
vocabulary's hash as its token space (predictor/token_space.py). `--vocab` imports into an existing id
space instead: the strings of that `vocab.json` keep their ids, strings it lacks map to its `<unk>` id
(appended when it has none), so a foreign prompt set can be scored by a predictor trained on the other.

The import streams (`import_moebeyond`): each member is parsed once, its token strings interned (one
entry per distinct string, with where it first appears) and its arrays spilled to a scratch file; then
the rows are written in prompt-id order through `TraceWriter` (predictor/trace_writer.py) with their
final ids. Memory is the vocabulary plus one prompt, not the archive: the same ids and rows as reading
every prompt first (`read_archive` + `build_vocab` + `records`, kept for tests and tools).
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import io
import json
import lzma
import re
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .token_space import UNK, vocab_space
from .trace_checks import decode_utf8
from .trace_writer import TraceWriter
from .traces import TraceFormatError, TraceMeta, TraceRecord, check_target

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "traces" / "deepseek-v2-lite-puffin"
DEFAULT_OUT = ROOT / "data" / "big" / "deepseek-v2-lite-puffin"
HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
MEMBER_RE = re.compile(r"(?:.*/)?prompt_(\d+)_data\.csv")
VOCAB_FILE = "vocab.json"


def deepseek_v2_lite_meta() -> TraceMeta:
    return TraceMeta(
        source_model="deepseek-ai/DeepSeek-V2-Lite-Chat",
        architecture="deepseek_v2",
        num_layers=27,
        moe_layers=list(range(1, 27)),
        num_experts=64,
        top_k=6,
        num_shared_experts=2,
        expert_shape={"hidden": 2048, "intermediate": 1408, "num_matrices": 3, "dtype_bytes": 2},
        prompt_source="LDJnr/Puffin (first human turn)",
        recording={"mode": "prefill", "note": "MoE-Beyond published traces"},
        vocab_file=VOCAB_FILE,
    )


@functools.cache
def _list_patterns(k: int) -> tuple[re.Pattern, re.Pattern]:
    """(one list, newline-joined lists) of exactly k non-negative ints, like "[8, 26, 56, 57, 60, 43]"."""
    sp, num = r"[ \t]*", r"[0-9]+"  # ASCII only: \d takes other scripts' digits, \s a newline inside a list
    one = rf"\[{sp}{num}" + rf"(?:{sp},{sp}{num})" * (k - 1) + rf"{sp}\]"
    return re.compile(one), re.compile(f"{one}(?:\n{one})*")


def parse_member(name: str, text: str, meta: TraceMeta) -> tuple[list[str], np.ndarray]:
    """One prompt's CSV text -> (token strings (T,), experts (T, L, k) in meta.expert_dtype).

    Errors raise TraceFormatError naming the member and the 1-based CSV line (header = line 1).
    """
    L, k, E = meta.num_moe_layers, meta.top_k, meta.num_experts
    layer_ids = np.asarray(meta.moe_layers)

    def fail(row: int | None, why: str) -> TraceFormatError:
        # row indexes the data rows; CSV line = row + 2 (line 1 is the header)
        where = name if row is None else f"{name}: line {row + 2}"
        return TraceFormatError(f"{where}: {why}")

    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0] != HEADER:
        raise TraceFormatError(f"{name}: line 1: header {rows[0] if rows else None} != {HEADER}")
    body = rows[1:]
    if not body:
        raise fail(None, "no data rows")
    if set(map(len, body)) != {4}:
        i = next(i for i, r in enumerate(body) if len(r) != 4)
        raise fail(i, f"expected 4 fields, got {len(body[i])}: {body[i]}")
    layer_col, batch_col, tokens, lists = zip(*body)

    plain = lambda v: v.strip().isascii() and v.strip().isdigit() and len(v.strip()) < 10  # noqa: E731
    if not all(map(plain, layer_col)):
        i = next(i for i, v in enumerate(layer_col) if not plain(v))
        raise fail(i, f"Layer ID {layer_col[i]!r} is not a layer number")
    layers = np.asarray(layer_col).astype(np.int64)
    if len(body) % L:
        raise fail(None, f"{len(body)} rows is not a multiple of the {L} MoE layers")
    T = len(body) // L
    expected = np.repeat(layer_ids, T)  # layer-major: T rows of each layer in order
    if not np.array_equal(layers, expected):
        i = int(np.flatnonzero(layers != expected)[0])
        raise fail(i, f"Layer ID {layers[i]} where layer-major order with {T} tokens per layer "
                      f"(layers {layer_ids[0]}..{layer_ids[-1]}) expects {expected[i]}")
    if any(b != "0" for b in batch_col):
        i = next(i for i, b in enumerate(batch_col) if b != "0")
        raise fail(i, f"Batch Number {batch_col[i]!r}, expected 0 (one sequence per file)")

    tok = np.asarray(tokens, dtype=object).reshape(L, T)
    diff = np.argwhere(tok != tok[0])
    if len(diff):
        layer, t = diff[0]
        raise fail(int(layer * T + t), f"token {tok[layer, t]!r} at position {t} of layer {layer_ids[layer]} "
                                       f"differs from layer {layer_ids[0]}'s {tok[0, t]!r}")

    one, many = _list_patterns(k)
    joined = "\n".join(lists)
    if not many.fullmatch(joined):  # one C-level match per file; the per-row scan only finds the culprit
        i = next(i for i, s in enumerate(lists) if not one.fullmatch(s))
        raise fail(i, f"Activated Expert IDs {lists[i]!r} is not a list of {k} ints")
    # the regex above guarantees a clean comma-separated stream of exactly len(body) * k ints
    flat = np.fromstring(joined.translate(_TO_COMMAS), dtype=np.int64, sep=",")
    ex = flat.reshape(L * T, k)
    bad = np.flatnonzero((ex >= E).any(1))
    if len(bad):
        raise fail(int(bad[0]), f"expert id out of range [0, {E}) in {lists[bad[0]]!r}")
    srt = np.sort(ex, axis=1)
    dup = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(1))
    if len(dup):
        raise fail(int(dup[0]), f"repeated expert id in {lists[dup[0]]!r}, expected {k} distinct")
    return list(tok[0]), ex.reshape(L, T, k).transpose(1, 0, 2).astype(meta.expert_dtype)


_TO_COMMAS = str.maketrans({"[": " ", "]": " ", "\n": ","})


def read_archive(tar_path: Path, meta: TraceMeta, limit: int | None = None) -> dict[int, tuple[list[str], np.ndarray]]:
    """Parse the first `limit` CSV members (archive order; all by default) -> {prompt_id: (tokens, experts)}."""
    return {pid: (tokens, experts) for pid, tokens, experts in iter_archive(tar_path, meta, limit)}


def iter_archive(tar_path: Path, meta: TraceMeta, limit: int | None = None) -> Iterator[tuple[int, list[str], np.ndarray]]:
    """(prompt_id, token strings, experts) of the first `limit` CSV members, one at a time in archive order."""
    seen: set[int] = set()
    try:  # a corrupt or truncated archive, or a file that is none, named as such (the rows' errors pass)
        with tarfile.open(tar_path, "r|*") as tar:  # stream mode: one pass over the compressed file
            for member in tar:
                if not member.isfile():
                    continue
                name = f"{tar_path}:{member.name}"
                m = MEMBER_RE.fullmatch(member.name)
                if not m:
                    raise TraceFormatError(f"{name}: unexpected file, expected csv/prompt_<id>_data.csv")
                pid = int(m.group(1))
                if pid in seen:
                    raise TraceFormatError(f"{name}: prompt {pid} appears twice in the archive")
                text = decode_utf8(tar.extractfile(member).read(), name, TraceFormatError)
                seen.add(pid)
                yield pid, *parse_member(name, text, meta)
                if limit is not None and len(seen) >= limit:
                    break
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as e:
        raise TraceFormatError(f"{tar_path}: not a readable tar archive ({type(e).__name__}: {e})") from None
    if not seen:
        raise TraceFormatError(f"{tar_path}: no prompt_<id>_data.csv files found")


class _Spill:
    """Pass 1 of the streaming import: each prompt's token strings interned (spill id = order of first
    sight in the archive) with, per string, the lowest prompt id it occurs in and its first position
    there, which orders the strings exactly as `build_vocab` does; the arrays go to two files in `folder`."""

    def __init__(self, folder: Path, expert_dtype: str):
        self.folder, self.expert_dtype = folder, expert_dtype
        self.strings: dict[str, int] = {}
        self.first = np.zeros((0, 2), dtype=np.int64)  # per spill id: (prompt id, position) of first occurrence
        self.count = np.zeros(0, dtype=np.int64)  # occurrences per spill id
        self.rows: dict[int, tuple[int, int]] = {}  # prompt id -> (first token, tokens)
        self.tokens = 0
        self._files = [open(folder / "tokens.int32", "wb"), open(folder / "experts.bin", "wb")]

    def add(self, pid: int, tokens: list[str], experts: np.ndarray) -> None:
        ids = np.fromiter((self.strings.setdefault(s, len(self.strings)) for s in tokens), np.int64, len(tokens))
        if len(self.strings) > len(self.count):
            grow = max(len(self.strings), 2 * len(self.count)) - len(self.count)
            self.first = np.concatenate([self.first, np.full((grow, 2), np.iinfo(np.int64).max)])
            self.count = np.concatenate([self.count, np.zeros(grow, dtype=np.int64)])
        uniq, pos, count = np.unique(ids, return_index=True, return_counts=True)
        earlier = pid < self.first[uniq, 0]
        self.first[uniq[earlier]] = np.stack([np.full(int(earlier.sum()), pid), pos[earlier]], -1)
        self.count[uniq] += count
        self._files[0].write(ids.astype(np.int32).tobytes())
        self._files[1].write(np.ascontiguousarray(experts, dtype=self.expert_dtype).tobytes())
        self.rows[pid] = (self.tokens, len(tokens))
        self.tokens += len(tokens)

    def vocab(self) -> dict[str, int]:
        """Token string -> id by first appearance over prompts in id order (= build_vocab of every prompt)."""
        n = len(self.strings)
        order = np.lexsort((self.first[:n, 1], self.first[:n, 0]))
        strings = list(self.strings)
        return {strings[i]: rank for rank, i in enumerate(order.tolist())}

    def records(self, final_ids: np.ndarray, shape: tuple[int, int]) -> Iterator[TraceRecord]:
        """Pass 2: the rows in prompt-id order, token ids mapped spill id -> `final_ids`."""
        for f in self._files:
            f.close()
        tokens = np.memmap(self.folder / "tokens.int32", dtype=np.int32, mode="r")
        experts = np.memmap(self.folder / "experts.bin", dtype=self.expert_dtype, mode="r").reshape(-1, *shape)
        for pid in sorted(self.rows):
            a, T = self.rows[pid]
            yield TraceRecord(prompt_id=pid, token_ids=final_ids[tokens[a : a + T]], experts=np.asarray(experts[a : a + T]),
                              num_prefill=T)


def build_vocab(prompts: dict[int, tuple[list[str], np.ndarray]]) -> dict[str, int]:
    """Token string -> id by first appearance over prompts in id order: stable across runs."""
    vocab: dict[str, int] = {}
    for pid in sorted(prompts):
        for s in prompts[pid][0]:
            vocab.setdefault(s, len(vocab))
    return vocab


def load_vocab(path: str | Path) -> dict[str, int]:
    """The `vocab.json` of an earlier import (a JSON list of distinct strings, index = id) as
    string -> id, with `<unk>` appended when it has none."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--vocab: no vocabulary file at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TraceFormatError(f"{path}: not a JSON vocabulary ({e})") from None
    if not isinstance(data, list):
        raise TraceFormatError(f"{path}: expected a JSON list of token strings, got {type(data).__name__}")
    vocab: dict[str, int] = {}
    for i, s in enumerate(data):
        if not isinstance(s, str):
            raise TraceFormatError(f"{path}: entry {i} is {s!r}, not a token string")
        if s in vocab:
            raise TraceFormatError(f"{path}: entry {i} {s!r} repeats entry {vocab[s]}")
        vocab[s] = i
    vocab.setdefault(UNK, len(vocab))
    return vocab


def records(prompts: dict[int, tuple[list[str], np.ndarray]], vocab: dict[str, int]) -> Iterator[TraceRecord]:
    unk = vocab[UNK]
    for pid in sorted(prompts):
        tokens, experts = prompts[pid]
        ids = np.fromiter((vocab.get(s, unk) for s in tokens), dtype=np.int32, count=len(tokens))
        yield TraceRecord(prompt_id=pid, token_ids=ids, experts=experts, num_prefill=len(tokens))


def import_moebeyond(
    src: str | Path, out: str | Path, *, limit: int | None = None, overwrite: bool = False,
    vocab: str | Path | None = None,
):
    """Import a MoE-Beyond csv.tar.xz (or a directory holding one) into a trace set at `out`; with
    `vocab` (an earlier import's vocab.json) into that id space, unknown strings -> its `<unk>` id."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be a positive number of prompts (or none for all), got {limit!r}")
    src = Path(src)
    tar_path = src / "csv.tar.xz" if src.is_dir() else src
    if not tar_path.is_file():
        raise FileNotFoundError(f"no MoE-Beyond archive at {tar_path}")
    check_target(out, overwrite, "--overwrite (overwrite=True from Python)")  # refuse a bad `out` before the long read of the archive
    ids = load_vocab(vocab) if vocab is not None else None  # a bad vocabulary fails before the read too
    meta = deepseek_v2_lite_meta()
    meta.recording["limit"] = limit  # a partial import (the first `limit` members) says so
    with TraceWriter(out, meta, overwrite=overwrite, source=str(tar_path)) as writer:
        spill = _Spill(writer.scratch(), meta.expert_dtype)
        for pid, tokens, experts in iter_archive(tar_path, meta, limit):
            spill.add(pid, tokens, experts)
        if ids is None:
            ids = spill.vocab()
            ids.setdefault(UNK, len(ids))
        unk = ids[UNK]
        final = np.fromiter((ids.get(s, unk) for s in spill.strings), np.int32, len(spill.strings))
        unknown = np.array([s not in ids for s in spill.strings], dtype=bool)
        meta.vocab_size, meta.unk_token_id, meta.token_space = len(ids), unk, vocab_space(list(ids))
        meta.recording.update(vocab=None if vocab is None else str(vocab),
                              unknown_tokens=int(spill.count[: len(unknown)][unknown].sum()),
                              unknown_strings=int(unknown.sum()))
        for rec in spill.records(final, (meta.num_moe_layers, meta.top_k)):
            writer.append(rec)
        writer.extra_files[VOCAB_FILE] = list(ids)
    return writer.result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m predictor.moebeyond", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"archive or its directory (default {DEFAULT_SRC})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"trace directory (default {DEFAULT_OUT})")
    ap.add_argument("--limit", type=int, default=None, help="import only the first N CSV files in archive order")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing trace directory")
    ap.add_argument("--vocab", type=Path, default=None,
                    help="vocab.json of an earlier import: use its ids; strings it lacks -> its <unk> id")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be a positive number of prompts, got {args.limit}")
    start = time.perf_counter()
    ts = import_moebeyond(args.src, args.out, limit=args.limit, overwrite=args.overwrite, vocab=args.vocab)
    m = ts.meta
    print(
        f"wrote {ts.path}: {m.num_sequences:,} prompts, {m.num_tokens:,} tokens, "
        f"{m.num_moe_layers} MoE layers x {m.top_k} experts of {m.num_experts}, "
        f"vocab {m.vocab_size:,} strings, {time.perf_counter() - start:.1f} s"
    )
    if args.vocab is not None and m.recording["unknown_tokens"]:
        r = m.recording
        print(f"{r['unknown_tokens']:,} tokens ({r['unknown_strings']:,} distinct strings) not in {args.vocab}: "
              f"mapped to <unk> = id {m.unk_token_id}")


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
