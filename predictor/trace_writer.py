"""Incremental trace writing: rows appended as they come, Arrow shards written as they fill, the set
finalised atomically. For producers that cannot hand `write_traces` one iterable of finished rows (an
import that learns its vocabulary as it reads, predictor/moebeyond.py):

    with TraceWriter(path, meta, overwrite=False, source="archive.tar.xz") as writer:
        for rec in rows():
            writer.append(rec)           # checked like write_traces (validate_record, errors name the row)
        writer.extra_files["vocab.json"] = vocab   # optional: JSON files written with the shards
    ts = writer.result                   # the loaded TraceSet, once the block exits cleanly

Memory is one write batch (`batch_bytes`), whatever the number of rows. Shards go straight into the
hidden `tmp` sibling of `path` (predictor/trace_store.py) and take `save_to_disk`'s names
(`data-XXXXX-of-NNNNN.arrow`) once their number is known; then `state.json` and `dataset_info.json`,
the extra files, `trace_meta.json` last, and the rename into place (an overwrite moves the old set
aside first). An exception inside the block removes everything it wrote and leaves `path` as it was; a
killed process leaves hidden siblings that `recover` (run by the next write or load of `path`) deletes.
`scratch()` is a hidden folder for the producer's own spill files, removed the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import write_json_atomic
from .token_space import default_token_space
from .trace_store import META_FILE, Claim, _move_into_place, check_target
from .traces import (
    TraceFormatError,
    TraceMeta,
    TraceRecord,
    TraceSet,
    features,
    load_traces,
    record_row,
    validate_record,
)


class TraceWriter:
    def __init__(self, path: str | Path, meta: TraceMeta, *, overwrite: bool = False, max_shard_size: str | int = "256MB",
                 source: str = "records", batch_bytes: int = 32 << 20):
        from datasets.utils.py_utils import convert_file_size_to_int

        self.path, self.meta, self.overwrite, self.source = Path(path), meta, overwrite, source
        meta.validate(f"{self.path}/{META_FILE}")
        check_target(self.path, overwrite)  # recovers leftovers of killed writes; refuses what is not ours
        self.max_shard_bytes = convert_file_size_to_int(max_shard_size)
        self.batch_bytes = batch_bytes
        self.extra_files: dict[str, object] = {}
        self.num_sequences = self.num_tokens = 0
        self.result: TraceSet | None = None
        self._features = features(meta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._claim = Claim(self.path)  # from here on our siblings are live: `recover` leaves them alone
        self._claim.tmp.mkdir()  # the finished copy, built up shard by shard
        self._shards: list[tuple[Path, int]] = []  # finished shards: (file, bytes)
        self._writer = self._shard = None  # the open shard's ArrowWriter and file
        self._batch: list[dict] = []
        self._pending = self._shard_bytes = 0
        self._open = True

    # ------------------------------------------------------------------ writing

    def scratch(self) -> Path:
        """A hidden folder next to `path` for the caller's temporary files, deleted with the write."""
        self._claim.build.mkdir(exist_ok=True)
        return self._claim.build

    def append(self, rec: TraceRecord) -> None:
        if not self._open:
            raise RuntimeError(f"TraceWriter({self.path}): append after the write was finished or aborted")
        m = self.meta
        validate_record(rec, m, f"{self.source}: row {self.num_sequences} (prompt_id={rec.prompt_id})")
        row = record_row(rec, m)
        T = len(row["token_ids"])
        # what the row takes in Arrow: values, plus an int32 offset per token and per (token, layer) list
        size = 16 + sum(v.nbytes for v in row.values() if isinstance(v, np.ndarray)) + 4 * T * (m.num_moe_layers + 2)
        if self._writer is not None and self._shard_bytes + size > self.max_shard_bytes:
            self._close_shard()
        self._batch.append(row)
        self._pending += size
        self._shard_bytes += size
        self.num_sequences += 1
        self.num_tokens += T
        if self._pending >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        if self._writer is None:
            from datasets.arrow_writer import ArrowWriter

            self._shard = self._claim.tmp / f"shard-{len(self._shards):05d}.arrow"
            self._writer = ArrowWriter(features=self._features, path=str(self._shard))
        self._writer.write_batch({col: [row[col] for row in self._batch] for col in self._features})
        self._batch, self._pending = [], 0

    def _close_shard(self) -> None:
        self._flush()
        if self._writer is not None:
            _, nbytes = self._writer.finalize()
            self._writer.close()
            self._shards.append((self._shard, nbytes))
            self._writer, self._shard_bytes = None, 0

    # ------------------------------------------------------------------ finishing

    def close(self) -> TraceSet:
        """Finish the shards, write the dataset's files (`trace_meta.json` last) and move it into place."""
        if not self._open:
            raise RuntimeError(f"TraceWriter({self.path}): already finished or aborted")
        try:
            self._close_shard()
            if self.num_sequences == 0:
                raise TraceFormatError(f"{self.source}: no records to write to {self.path}")
            self._finalise()
            _move_into_place(self._claim.tmp, self.path, self._claim.trash, self.overwrite)
        finally:
            self._cleanup()
        self.result = load_traces(self.path, validate=False)  # every row was checked on the way in
        return self.result

    def _finalise(self) -> None:
        import datasets
        from datasets.utils.py_utils import asdict

        m, n = self.meta, len(self._shards)
        names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
        for (shard, _), name in zip(self._shards, names):
            shard.rename(self._claim.tmp / name)
        # the two files `save_to_disk` writes next to its shards, which `load_from_disk` reads
        write_json_atomic(self._claim.tmp / "state.json", {
            "_data_files": [{"filename": name} for name in names], "_fingerprint": f"traces-{self._claim.tag}",
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
            "_split": "train",
        })
        size = sum(nbytes for _, nbytes in self._shards)
        splits = datasets.SplitDict()
        splits.add(datasets.SplitInfo(name="train", num_bytes=size, num_examples=self.num_sequences))
        info = datasets.DatasetInfo(features=self._features, dataset_size=size, size_in_bytes=size, splits=splits)
        info = asdict(info)
        write_json_atomic(self._claim.tmp / "dataset_info.json", {key: info[key] for key in sorted(info)})
        if m.token_space is None:  # every new trace set names its token space
            m.token_space = default_token_space(m.tokenizer, self.extra_files.get(m.vocab_file or ""))
        m.num_sequences, m.num_tokens = self.num_sequences, self.num_tokens
        m.validate(f"{self.path}/{META_FILE}")
        for name, data in self.extra_files.items():
            write_json_atomic(self._claim.tmp / name, data)
        # the meta file is written last: its presence marks the dataset as whole
        write_json_atomic(self._claim.tmp / META_FILE, m.to_dict())

    def abort(self) -> None:
        """Drop everything written so far; `path` stays as it was."""
        if self._open:
            self._cleanup()

    def _cleanup(self) -> None:
        self._open = False
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - closing a half-written shard that is deleted next
                pass
            self._writer = None
        self._batch = []
        self._claim.release()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
