"""Memory at scale (issue #16): the incremental trace writer (round trip, crash safety), chunked
statistics and fits equal to the stacked ones, the simulator's train counts, and the streaming import."""

import copy
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import write_tar
from test_traces import make_meta, make_records

from predictor.baselines import all_baselines, fit_all, stack, stack_rows
from predictor.chunks import chunk_bounds, row_chunks
from predictor.evaluation_rows import head, select_rows, train_replay_stats
from predictor.simulate import build_accesses
from predictor.simulate.policy import reuse_hazard
from predictor.simulate.scorers import ActivationMatrixScorer, CoOccurrenceScorer
from predictor.stats import compute_stats, per_layer_stats, streamed_layer_stats
from predictor.trace_writer import TraceWriter
from predictor.traces import META_FILE, TraceFormatError, load_traces, write_traces


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _same_rows(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.prompt_id, x.num_prefill) == (y.prompt_id, y.num_prefill)
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.experts, y.experts)


def test_writer_round_trips_in_several_shards(tmp_path):
    meta = make_meta()
    recs = make_records(40, meta)
    ref = write_traces(tmp_path / "ref", copy.deepcopy(meta), recs)
    with TraceWriter(tmp_path / "t", meta, max_shard_size="2KB", batch_bytes=500) as writer:
        for rec in recs:
            writer.append(rec)
        writer.extra_files["notes.json"] = {"a": 1}
    ts = writer.result
    assert len(list((tmp_path / "t").glob("data-*-of-*.arrow"))) > 1
    _same_rows(ts, ref)
    for rec, back in zip(recs, load_traces(tmp_path / "t")):  # a full, validating load
        np.testing.assert_allclose(back.weights, rec.weights, atol=1e-3)
    assert ts.meta.to_dict() == ref.meta.to_dict()  # counts and token space as write_traces sets them
    assert json.loads((tmp_path / "t" / "notes.json").read_text()) == {"a": 1}
    assert _names(tmp_path) == ["ref", "t"]  # no hidden folder left
    with pytest.raises(RuntimeError, match="after the write"):
        writer.append(recs[0])


def test_writer_errors_leave_nothing_and_keep_an_old_set(tmp_path):
    meta = make_meta()
    recs = make_records(6, meta)
    write_traces(tmp_path / "t", copy.deepcopy(meta), recs[:3])
    bad = copy.deepcopy(recs[4])
    bad.experts[0, 1] = [3, 3]
    with pytest.raises(TraceFormatError, match=r"a.csv: row 4 \(prompt_id=102\): duplicate expert id"):
        with TraceWriter(tmp_path / "t", copy.deepcopy(meta), overwrite=True, source="a.csv", max_shard_size="1KB") as w:
            for rec in [*recs[:4], bad]:
                w.append(rec)
    assert _names(tmp_path) == ["t"] and len(load_traces(tmp_path / "t")) == 3  # the old set, untouched
    with pytest.raises(FileExistsError):
        TraceWriter(tmp_path / "t", copy.deepcopy(meta))
    with pytest.raises(TraceFormatError, match="no records"):
        with TraceWriter(tmp_path / "u", copy.deepcopy(meta)):
            pass
    assert _names(tmp_path) == ["t"]


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_traces import make_meta, make_records
from predictor.trace_writer import TraceWriter
path, meta = Path(sys.argv[1]), make_meta()
writer = TraceWriter(path, meta, overwrite=True, max_shard_size="1KB", batch_bytes=200)
(writer.scratch() / "spill.bin").write_bytes(b"x")
for rec in make_records(30, meta, seed=1):
    writer.append(rec)
os.kill(os.getpid(), signal.SIGKILL)  # shards on disk, not finished
"""


def test_killed_writer_leaves_the_old_set_and_is_cleaned_up(tmp_path):
    meta = make_meta()
    path = tmp_path / "t"
    write_traces(path, copy.deepcopy(meta), make_records(3, meta))
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    hidden = [n for n in _names(tmp_path) if n != "t"]
    assert {n.split("-")[0] for n in hidden} == {".t.tmp", ".t.build", ".t.lock"}  # shards, scratch, the dropped lock
    assert len(load_traces(path)) == 3  # the old set, whole
    with TraceWriter(path, copy.deepcopy(meta), overwrite=True) as w:  # the next write removes the dead one's folders
        for rec in make_records(2, meta):
            w.append(rec)
    assert _names(tmp_path) == ["t"] and len(load_traces(path)) == 2
    fresh = tmp_path / "fresh"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(fresh), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    with pytest.raises(FileNotFoundError, match="no trace dataset"):
        load_traces(fresh)  # nothing half-written is ever taken for a trace set; the load cleans up
    assert _names(tmp_path) == ["t"]


def test_chunks_equal_the_stacked_rows(tmp_path):
    meta = make_meta(has_weights=False)
    recs = make_records(25, meta)
    for r in recs:
        r.weights = None
    ts = write_traces(tmp_path / "t", meta, recs)
    for view in (ts, ts.select([20, 3, 7, 7, 0])):
        tokens, experts, lengths = stack_rows(view)
        for max_tokens in (1, 17, 10**6):
            for source in (view, list(view)):
                chunks = list(row_chunks(source, max_tokens))
                np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks]), tokens)
                np.testing.assert_array_equal(np.concatenate([c.experts for c in chunks]), experts)
                np.testing.assert_array_equal(np.concatenate([c.lengths for c in chunks]), lengths)
                assert all(c.lengths.sum() <= max_tokens or len(c.lengths) == 1 for c in chunks)
    assert chunk_bounds(np.array([3, 4, 5, 1]), 7) == [(0, 2), (2, 4)]


def stats_set(tmp_path):
    from test_stats_baselines import meta, records

    return write_traces(tmp_path / "s", meta(), records("chain", n=40))


def test_streamed_stats_and_fits_equal_the_stacked_ones(tmp_path, monkeypatch):
    ts = stats_set(tmp_path)
    tokens, experts, lengths = stack_rows(ts)
    want = per_layer_stats(experts, lengths, ts.meta.num_experts)
    got, n = streamed_layer_stats(ts, ts.meta.num_experts)
    assert n == len(tokens) and {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in want.items()}
    train, val = ts.select(np.arange(30)), list(ts.select(np.arange(30, 40)))
    E = ts.meta.num_experts
    stacked = [b.fit_arrays(*stack(train)) for b in all_baselines(E)]
    streamed = fit_all(all_baselines(E), train, max_tokens=23)  # several chunks
    for a, b in zip(stacked, streamed):
        for rec in val:
            np.testing.assert_array_equal(a.scores(rec), b.scores(rec), err_msg=a.name)
    whole_chunk = compute_stats(ts)
    monkeypatch.setattr("predictor.stats.row_chunks", lambda data: row_chunks(data, 11))  # chunks of 11 tokens
    monkeypatch.setattr("predictor.stats.fit_all", lambda chosen, data: fit_all(chosen, data, 11))
    assert compute_stats(ts) == whole_chunk
    capped = compute_stats(ts, max_sequences=3)
    assert capped["split"]["val_prompts"] == 3 and capped["layers"] == whole_chunk["layers"]


def test_simulator_train_counts_and_scorers_stream(tmp_path):
    ts = stats_set(tmp_path)
    m = ts.meta
    train = select_rows(ts, "train", {"train": 0.8, "val": 0.2}, 0, None)
    acc = build_accesses(list(train), m.num_moe_layers, m.num_experts, m.top_k)
    freq, hazard = train_replay_stats(train)
    np.testing.assert_array_equal(freq, acc.layer_frequency())
    whole = reuse_hazard(acc)
    np.testing.assert_array_equal(hazard.rate, whole.rate)
    np.testing.assert_array_equal(hazard.factor, whole.factor)
    rec = ts.record(35)
    for make in (lambda: CoOccurrenceScorer(m.num_experts), lambda: ActivationMatrixScorer(m.num_experts, max_matrices=7)):
        np.testing.assert_array_equal(make().fit(train).scores(rec), make().fit(list(train)).scores(rec))
    assert len(head(train, 5)) == 5 and head(train, None) is train
    np.testing.assert_array_equal(head(train, 5).prompt_ids, train.prompt_ids[:5])


def test_mapped_rows_read_what_the_dataset_reads_and_release_their_pages(tmp_path):
    import pickle

    from predictor.mapped_rows import MappedRows, release_mapped
    from predictor.trace_sets import load_trace_sets

    meta = make_meta(has_weights=False)
    recs = make_records(12, meta)
    for r in recs:
        r.weights = None
    write_traces(tmp_path / "a", copy.deepcopy(meta), recs[:7])
    write_traces(tmp_path / "b", copy.deepcopy(meta), recs[7:])
    for ts in (load_traces(tmp_path / "a"), load_trace_sets([tmp_path / "a", tmp_path / "b"])):  # prompt ids shifted
        rows = MappedRows(ts, release_every=2)
        for reader in (rows, pickle.loads(pickle.dumps(rows))):  # as a DataLoader worker gets it
            for i in range(len(ts)):
                tokens, experts, pid = reader.read(i)
                want = ts.dataset[i]
                np.testing.assert_array_equal(tokens, want["token_ids"])
                np.testing.assert_array_equal(experts, want["experts"])
                assert pid == int(want["prompt_id"])
    if sys.platform == "linux":
        assert release_mapped(rows._files) > 0  # the files are mapped, and reading them afterwards still works
    np.testing.assert_array_equal(rows.read(3)[1], ts.dataset[3]["experts"])
    view = MappedRows(ts.select([4, 2]))  # a select()ed view reads through the dataset
    np.testing.assert_array_equal(view.read(0)[0], ts.dataset[4]["token_ids"])


def member_csv(tokens: list[str], rng) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["Layer ID", "Batch Number", "Token", "Activated Expert IDs"])
    for layer in range(1, 27):
        for tok in tokens:
            w.writerow([layer, 0, tok, json.dumps(rng.permutation(64)[:6].tolist()).replace(",", ", ")])
    return out.getvalue()


def test_streaming_import_matches_reading_every_prompt_first(tmp_path):
    """Members out of prompt-id order: rows come out sorted by prompt id, ids by first appearance there."""
    from predictor.moebeyond import (
        build_vocab,
        deepseek_v2_lite_meta,
        import_moebeyond,
        read_archive,
        records,
    )

    rng = np.random.default_rng(0)
    words = ["a", "b", "c", "d", "e", "<unk>", "f"]
    members = {f"csv/prompt_{pid}_data.csv": member_csv([words[i] for i in rng.integers(0, 7, n)], rng)
               for pid, n in ((12, 5), (3, 4), (40, 6), (7, 3), (25, 2))}
    tar = write_tar(tmp_path / "csv.tar.xz", members)
    ts = import_moebeyond(tar, tmp_path / "out")
    prompts = read_archive(tar, deepseek_v2_lite_meta())
    vocab = build_vocab(prompts)
    vocab.setdefault("<unk>", len(vocab))
    assert json.loads((tmp_path / "out" / "vocab.json").read_text()) == list(vocab)
    _same_rows(ts, list(records(prompts, vocab)))
    assert ts.prompt_ids.tolist() == [3, 7, 12, 25, 40]
    # into an earlier id space: unseen strings -> its <unk>, counted
    (tmp_path / "v.json").write_text(json.dumps(["c", "a", "zz"]))
    other = import_moebeyond(tar, tmp_path / "other", vocab=tmp_path / "v.json")
    fixed = {"c": 0, "a": 1, "zz": 2, "<unk>": 3}
    _same_rows(other, list(records(prompts, fixed)))
    unknown = [s for tokens, _ in prompts.values() for s in tokens if s not in fixed]
    r = other.meta.recording
    assert (r["unknown_tokens"], r["unknown_strings"], other.meta.unk_token_id) == (len(unknown), len(set(unknown)), 3)
    assert _names(tmp_path) == ["csv.tar.xz", "other", "out", "v.json"]  # scratch files are gone
    with pytest.raises(FileExistsError):
        import_moebeyond(tar, tmp_path / "out")
    assert (tmp_path / "out" / META_FILE).is_file()
