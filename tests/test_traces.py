"""The trace format: round trip, atomic writes, and every validation error."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from predictor import traces
from predictor.traces import (
    META_FILE,
    TraceFormatError,
    TraceMeta,
    TraceRecord,
    check_target,
    load_traces,
    split_indices,
    validate_record,
    validate_traces,
    write_traces,
)


def make_meta(**kw) -> TraceMeta:
    base = dict(source_model="tiny", architecture="olmoe", num_layers=3, moe_layers=[0, 1, 2],
                num_experts=8, top_k=2, vocab_size=50, has_weights=True)
    base.update(kw)
    return TraceMeta(**base)


def make_records(n: int, meta: TraceMeta, seed: int = 0) -> list[TraceRecord]:
    rng = np.random.default_rng(seed)
    L, k, E = meta.num_moe_layers, meta.top_k, meta.num_experts
    out = []
    for i in range(n):
        T = int(rng.integers(3, 12))
        experts = np.argsort(rng.random((T, L, E)), axis=-1)[..., :k]
        out.append(TraceRecord(prompt_id=100 + i // 2, token_ids=rng.integers(0, meta.vocab_size, T),
                               experts=experts, num_prefill=T - i % 3,
                               weights=rng.random((T, L, k)).astype(np.float32)))
        if meta.gate_ahead:
            out[-1].gate_ahead = np.argsort(rng.random((T, L, E)), axis=-1)[..., : meta.gate_ahead]
    return out


def test_round_trip(tmp_path):
    meta = make_meta()
    recs = make_records(9, meta)
    ts = write_traces(tmp_path / "t", meta, recs)
    assert len(ts) == 9 and ts.meta.num_sequences == 9
    assert ts.meta.num_tokens == sum(r.num_tokens for r in recs)
    assert ts.lengths.tolist() == [r.num_tokens for r in recs]
    for rec, back in zip(recs, ts):
        assert back.prompt_id == rec.prompt_id and back.num_prefill == rec.num_prefill
        np.testing.assert_array_equal(back.token_ids, rec.token_ids)
        np.testing.assert_array_equal(back.experts, rec.experts)
        np.testing.assert_allclose(back.weights, rec.weights, atol=1e-3)  # stored as float16
    assert back.is_decode.sum() == back.num_tokens - back.num_prefill
    again = load_traces(tmp_path / "t")
    assert again.meta == ts.meta and again.dataset.features["experts"].dtype == "uint8"
    validate_traces(tmp_path / "t")


def test_wide_expert_ids_use_int16(tmp_path):
    meta = make_meta(num_experts=300, top_k=3, has_weights=False)
    ts = write_traces(tmp_path / "t", meta, make_records(2, meta))
    assert ts.dataset.features["experts"].dtype == "int16"
    assert ts.record(0).experts.max() < 300


def test_write_is_atomic(tmp_path):
    meta = make_meta()
    good = make_records(3, meta)

    def interrupted():
        yield from good
        raise KeyboardInterrupt  # the writer dies half-way

    with pytest.raises(KeyboardInterrupt):
        write_traces(tmp_path / "t", meta, interrupted())
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp dirs left
    write_traces(tmp_path / "t", meta, good)
    with pytest.raises(FileExistsError, match="t exists; pass overwrite=True to replace it"):
        write_traces(tmp_path / "t", meta, good)
    # a failed overwrite keeps the old complete dataset
    bad = make_records(2, meta)
    bad[1].experts[0, 0, 0] = 99
    with pytest.raises(TraceFormatError):
        write_traces(tmp_path / "t", meta, bad, overwrite=True)
    assert len(load_traces(tmp_path / "t")) == 3


def test_incomplete_directory_is_refused(tmp_path):
    meta = make_meta()
    write_traces(tmp_path / "t", meta, make_records(2, meta))
    (tmp_path / "t" / META_FILE).unlink()
    with pytest.raises(TraceFormatError, match="not a complete trace dataset"):
        load_traces(tmp_path / "t")
    with pytest.raises(FileNotFoundError):
        load_traces(tmp_path / "missing")
    (tmp_path / "other").mkdir()  # a folder that never was one: no interrupted write to suggest
    with pytest.raises(TraceFormatError, match=f"{tmp_path / 'other'}: no {META_FILE}: not a trace set"):
        load_traces(tmp_path / "other")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer names a process
    return proc.pid


def test_overwrite_refuses_what_is_not_a_trace_set(tmp_path):
    meta = make_meta()
    recs = make_records(2, meta)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "x.bin").write_bytes(b"1")
    message = rf"refusing to overwrite {re.escape(str(mine))}: not a trace dataset"
    with pytest.raises(ValueError, match=message):
        write_traces(mine, meta, recs, overwrite=True)
    with pytest.raises(ValueError, match=message):
        check_target(mine, overwrite=True)  # what collect / the importer call before any long work
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "sub" / "x.bin").read_bytes() == b"1"
    file = tmp_path / "file"
    file.write_text("data")
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: it is a file"):
        write_traces(file, meta, recs, overwrite=True)
    assert file.read_text() == "data"
    write_traces(tmp_path / "t", meta, recs)
    (tmp_path / "link").symlink_to(tmp_path / "t")
    with pytest.raises(ValueError, match="it is a symlink"):
        write_traces(tmp_path / "link", meta, recs, overwrite=True)
    write_traces(tmp_path / "t", meta, recs, overwrite=True)  # a trace set it made: replaced
    (tmp_path / "t" / "thesis.tex").write_text("mine")  # a trace set with a user's file in it: not ours to delete
    with pytest.raises(ValueError, match="nothing else"):
        write_traces(tmp_path / "t", meta, recs, overwrite=True)
    (tmp_path / "t" / "thesis.tex").unlink()
    (tmp_path / "t" / META_FILE).write_text("not json at all")  # a meta file that does not read
    with pytest.raises(ValueError, match="a readable trace_meta.json"):
        write_traces(tmp_path / "t", meta, recs, overwrite=True)
    (tmp_path / "t" / META_FILE).unlink()  # an incomplete set is not ours to delete either
    with pytest.raises(ValueError, match="a readable trace_meta.json"):
        write_traces(tmp_path / "t", meta, recs, overwrite=True)
    assert _names(tmp_path) == ["file", "link", "mine", "t"]  # nothing deleted, no temp dirs left
    (tmp_path / "empty").mkdir()
    assert len(write_traces(tmp_path / "empty", meta, recs, overwrite=True)) == 2
    write_traces(tmp_path / "u", meta, recs)
    assert len(write_traces(tmp_path / "u", meta, make_records(3, meta), overwrite=True)) == 3


def test_interrupt_between_renames_moves_the_old_dataset_back(tmp_path, monkeypatch):
    meta = make_meta()
    path = tmp_path / "t"
    write_traces(path, meta, make_records(3, meta))
    real, hit = os.replace, []

    def interrupted(src, dst):
        if Path(dst) == path and not hit:  # `t` was just moved aside; the new copy is not in place yet
            hit.append(Path(src).name)
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_traces(path, meta, make_records(4, meta, seed=1), overwrite=True)
    monkeypatch.undo()
    assert hit and hit[0].startswith(".t.tmp-")
    assert _names(tmp_path) == ["t"] and len(load_traces(path)) == 3


@pytest.mark.parametrize("next_step", ["load", "write"])
def test_crash_between_renames_is_recovered(tmp_path, monkeypatch, next_step):
    meta = make_meta()
    path = tmp_path / "t"
    write_traces(path, meta, make_records(3, meta))
    real = os.replace

    def crashed(src, dst):
        if Path(dst) == path:  # every rename onto `t` fails, the move back included
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crashed)
    with pytest.raises(OSError, match="simulated crash"):
        write_traces(path, meta, make_records(4, meta, seed=1), overwrite=True)
    monkeypatch.undo()
    assert not path.exists() and [n for n in _names(tmp_path) if n.startswith(".t.old-")]
    if next_step == "load":
        assert len(load_traces(path)) == 3
    else:
        with pytest.raises(FileExistsError):  # restored first, so `t` exists again
            write_traces(path, meta, make_records(4, meta, seed=1))
        assert len(write_traces(path, meta, make_records(4, meta, seed=1), overwrite=True)) == 4
    assert _names(tmp_path) == ["t"]


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_traces import make_meta, make_records
from predictor.traces import write_traces
path, meta = Path(sys.argv[1]), make_meta()
write_traces(path, meta, make_records(3, meta))
real = os.replace
def killed(src, dst):
    if Path(dst) == path:  # between the two renames of the overwrite
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = killed
write_traces(path, meta, make_records(4, meta, seed=1), overwrite=True)
"""


def test_killed_overwrite_is_recovered(tmp_path):
    path = tmp_path / "t"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = _names(tmp_path)
    assert "t" not in left and {n.split("-")[0] for n in left} >= {".t.old", ".t.tmp"}
    assert len(load_traces(path)) == 3  # the old dataset is back; the killed write's folders are gone
    assert _names(tmp_path) == ["t"]


def test_stale_hidden_folders_are_removed_only_when_ours_and_dead(tmp_path):
    meta = make_meta()
    path = tmp_path / "t"
    write_traces(path, meta, make_records(2, meta))
    dead = _dead_pid()
    other_host = "000000" if traces._host() != "000000" else "111111"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        stale = [traces._sibling(path, kind, "0123abcd", pid=dead) for kind in traces.HIDDEN_KINDS]
        kept = [
            traces._sibling(path, "tmp", "4567abcd", pid=live.pid),  # a writer that is still running
            traces._sibling(path, "tmp", "89abcdef", pid=dead, host=other_host),  # pid not checkable here
            traces._sibling(tmp_path / "u", "tmp", "0123abcd", pid=dead),  # another target
            tmp_path / ".t.tmp-0123abcd",  # not our pattern
        ]
        for folder in stale + kept:
            folder.mkdir()
            (folder / META_FILE).write_text("{}")
        assert len(write_traces(path, meta, make_records(3, meta), overwrite=True)) == 3
        assert not any(folder.exists() for folder in stale)  # `t` exists, so the old copy is not restored
        assert all((folder / META_FILE).exists() for folder in kept)
        # a live writer's copy is never taken, even when `t` is missing
        shutil.rmtree(path)
        live_old = traces._sibling(path, "old", "4567abcd", pid=live.pid)
        shutil.copytree(kept[0], live_old)
        with pytest.raises(FileNotFoundError, match="still running") as err:
            load_traces(path)
        assert live_old.name in str(err.value) and live_old.exists() and not path.exists()
    finally:
        live.kill()
        live.wait()


def test_a_writer_whose_pid_looks_dead_but_holds_its_lock_is_left_alone(tmp_path):
    """A writer in another PID namespace with our hostname (containers sharing one) has a pid we
    cannot see: its lock file, not its pid, says it is alive. Released, its leftovers are recovered."""
    fcntl = pytest.importorskip("fcntl", reason="no flock on this platform")
    meta = make_meta()
    path = tmp_path / "t"
    write_traces(path, meta, make_records(2, meta))
    assert _names(tmp_path) == ["t"]  # a finished write leaves no lock file behind
    dead = _dead_pid()
    tmp, lock = (traces._sibling(path, kind, "0123abcd", pid=dead) for kind in ("tmp", "lock"))
    tmp.mkdir()
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the other namespace's writer, alive
        assert len(write_traces(path, meta, make_records(3, meta), overwrite=True)) == 3
        assert tmp.is_dir() and lock.exists()
    finally:
        os.close(fd)  # it dies: the kernel drops its lock
    assert len(write_traces(path, meta, make_records(4, meta), overwrite=True)) == 4
    assert _names(tmp_path) == ["t"]


def test_a_lock_unlinked_before_it_was_held_is_taken_again_and_our_pid_is_not_proof(tmp_path, monkeypatch):
    """A recoverer that found the fresh lock file before its flock took it for dead and unlinked it: the
    writer locks a new file. And a writer in another PID namespace can have our pid: its held lock, not
    the pid, decides."""
    from predictor import trace_store

    fcntl = pytest.importorskip("fcntl", reason="no flock on this platform")
    real, calls = fcntl.flock, []

    def racing(fd, op):
        if op == fcntl.LOCK_EX and not calls:  # the recoverer, between the writer's open and its flock
            calls.append(fd)
            for lock in tmp_path.glob(".t.lock-*"):
                lock.unlink()
        return real(fd, op)

    monkeypatch.setattr(trace_store.fcntl, "flock", racing)
    claim = trace_store.Claim(tmp_path / "t")
    monkeypatch.setattr(trace_store.fcntl, "flock", real)
    locks = list(tmp_path.glob(".t.lock-*"))
    assert calls and len(locks) == 1 and trace_store._lock_held(locks[0]) is True
    claim.tmp.mkdir()
    trace_store._ACTIVE.discard(claim.tag)  # as if the claim were another namespace's, with our pid
    try:
        trace_store.recover(tmp_path / "t")
        assert claim.tmp.is_dir() and locks[0].exists()  # its lock is held: alive
    finally:
        trace_store._ACTIVE.add(claim.tag)
        claim.release()
    assert list(tmp_path.iterdir()) == []


def test_a_filesystem_without_locks_still_writes(tmp_path, monkeypatch):
    """flock refused (ENOLCK on some network filesystems): no lock file is left to look unheld, and
    liveness falls back to the pid."""
    import errno

    from predictor import trace_store

    fcntl = pytest.importorskip("fcntl", reason="no flock on this platform")

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(trace_store, "fcntl", type("NoLocks", (), {"flock": staticmethod(refuse),
                                                                  "LOCK_EX": fcntl.LOCK_EX, "LOCK_NB": fcntl.LOCK_NB}))
    meta = make_meta()
    assert len(write_traces(tmp_path / "t", meta, make_records(2, meta))) == 2
    assert _names(tmp_path) == ["t"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.experts.__setitem__((1, 2, 0), 8), r"expert id 8 out of range \[0, 8\) at token 1, MoE layer 2"),
        (lambda r: r.experts.__setitem__((0, 0, 0), -1), r"out of range \[0, 8\) at token 0, MoE layer 0"),
        (lambda r: setattr(r, "experts", r.experts[..., :1]), r"wrong k: 1 experts per token and layer, meta top_k = 2"),
        (lambda r: setattr(r, "experts", r.experts[:, :2]), r"ragged layers: experts for 2 MoE layers, meta has 3"),
        (lambda r: setattr(r, "token_ids", r.token_ids[:-1]), r"mismatched lengths"),
        (lambda r: r.experts.__setitem__((0, 1), [3, 3]), r"duplicate expert id in \[3, 3\] at token 0, MoE layer 1"),
        (lambda r: r.token_ids.__setitem__(0, 50), r"token id 50 out of range \[0, 50\) at token 0"),
        (lambda r: setattr(r, "num_prefill", 99), r"num_prefill = 99 outside"),
        (lambda r: setattr(r, "weights", None), r"has no gate weights"),
        (lambda r: setattr(r, "weights", r.weights[:, :1]), r"weights shape"),
        (lambda r: setattr(r, "experts", r.experts[0]), r"experts must be \(tokens, layers, k\)"),
    ],
)
def test_validation_errors_name_row_and_problem(tmp_path, mutate, message):
    meta = make_meta()
    recs = make_records(4, meta)
    mutate(recs[2])
    with pytest.raises(TraceFormatError, match=message) as err:
        write_traces(tmp_path / "t", meta, recs, source="prompts.csv")
    assert "prompts.csv: row 2 (prompt_id=101)" in str(err.value)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"top_k": 9}, "key 'top_k' = 9 exceeds num_experts"),
        ({"moe_layers": [2, 1]}, "key 'moe_layers' must be strictly increasing"),
        ({"moe_layers": [0, 5]}, r"key 'moe_layers' must lie in \[0, num_layers=3\)"),
        ({"num_experts": 0}, "key 'num_experts' must be a positive int"),
    ],
)
def test_meta_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(TraceFormatError, match=message):
        make_meta(**change).validate()


def test_meta_file_errors(tmp_path):
    meta = make_meta()
    write_traces(tmp_path / "t", meta, make_records(2, meta))
    path = tmp_path / "t" / META_FILE
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "colour": "blue"}))
    with pytest.raises(TraceFormatError, match=r"unknown keys \['colour'\]"):
        load_traces(tmp_path / "t")
    del raw["top_k"]
    path.write_text(json.dumps(raw))
    with pytest.raises(TraceFormatError, match=r"missing keys \['top_k'\]"):
        load_traces(tmp_path / "t")
    path.write_text("{")
    with pytest.raises(TraceFormatError, match="not valid JSON"):
        load_traces(tmp_path / "t")


def test_meta_disagreeing_with_shards(tmp_path):
    meta = make_meta()
    write_traces(tmp_path / "t", meta, make_records(2, meta))
    path = tmp_path / "t" / META_FILE
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "top_k": 3}))
    with pytest.raises(TraceFormatError, match=r"experts column has shape"):
        load_traces(tmp_path / "t")
    # a token count that disagrees with the rows (a shard swapped by hand) is named; 0 is a meta that did not count
    tokens = sum(len(r.token_ids) for r in make_records(2, meta))
    for count in (tokens + 1, 0, tokens):
        path.write_text(json.dumps({**raw, "num_tokens": count}))
        if count in (0, tokens):
            assert len(load_traces(tmp_path / "t", validate=False)) == 2
            continue
        with pytest.raises(TraceFormatError, match=re.escape(f"{tmp_path / 't'}: {tokens} tokens but {META_FILE} says "
                                                             f"num_tokens = {count}")):
            load_traces(tmp_path / "t", validate=False)


def test_an_error_while_the_records_stream_is_raised_as_itself(tmp_path):
    """datasets wraps what the generator raises (a model's, generate()'s, CUDA's) in one generic error."""
    meta = make_meta()

    def records():
        yield from make_records(1, meta)
        raise RuntimeError("CUDA out of memory (the recorder's own error)") from OSError("its own cause")

    with pytest.raises(RuntimeError, match="CUDA out of memory") as e:
        write_traces(tmp_path / "t", meta, records())
    assert isinstance(e.value.__cause__, OSError)  # its own chain kept
    assert not (tmp_path / "t").exists()


def test_validate_record_without_writing():
    meta = make_meta()
    rec = make_records(1, meta)[0]
    validate_record(rec, meta, "x")
    rec.experts = rec.experts[:0]
    rec.token_ids = rec.token_ids[:0]
    with pytest.raises(TraceFormatError, match="x: empty sequence"):
        validate_record(rec, meta, "x")


def test_split_is_by_prompt_and_deterministic():
    prompt_ids = np.repeat(np.arange(50), 3)
    a = split_indices(prompt_ids, {"train": 0.8, "val": 0.2}, seed=1)
    b = split_indices(prompt_ids, {"train": 0.8, "val": 0.2}, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len(a["train"]) + len(a["val"]) == len(prompt_ids)
    assert not set(prompt_ids[a["train"]]) & set(prompt_ids[a["val"]])
    assert len(set(prompt_ids[a["val"]])) == 10
    with pytest.raises(ValueError, match="sum to"):
        split_indices(prompt_ids, {"train": 0.8, "val": 0.1})


def test_cli_info_and_validate(tmp_path, capsys):
    from predictor.traces import main

    meta = make_meta()
    write_traces(tmp_path / "t", meta, make_records(2, meta))
    main(["validate", str(tmp_path / "t")])
    out = capsys.readouterr().out
    assert "all rows valid" in out and '"top_k": 2' in out


def test_select_view_and_extra_files(tmp_path):
    meta = make_meta(vocab_file="vocab.json")
    recs = make_records(6, meta)
    ts = write_traces(tmp_path / "t", meta, recs, extra_files={"vocab.json": [f"w{i}" for i in range(50)]})
    assert ts.vocab()[3] == "w3"
    sub = ts.select([4, 1])
    assert sub.prompt_ids.tolist() == [recs[4].prompt_id, recs[1].prompt_id]
    assert sub.lengths.tolist() == [recs[4].num_tokens, recs[1].num_tokens]
    assert sub.record(0).num_tokens == recs[4].num_tokens


def test_every_view_reads_its_own_rows_prompt_keys():
    """`datasets` slices the table for a contiguous select (no index map), so whole-table keys read through
    the view's index map came back for the whole table; a slice asked first left its keys as the table's."""
    from predictor.splits import prompt_keys

    ts = load_traces(Path(__file__).parents[1] / "data/demo/traces", validate=False)
    first = ts.select(np.arange(3))
    assert len(first.prompt_keys) == 3  # asked before the whole set's: it must not become the set's keys
    full = prompt_keys(ts.dataset.data)
    assert np.array_equal(ts.prompt_keys, full)
    for indices in ([5], np.arange(10, 20), [9, 2, 700], [-1]):
        view = ts.select(indices)
        assert np.array_equal(view.prompt_keys, full[indices]), indices
        assert np.array_equal(view.prompt_ids, ts.prompt_ids[indices])
    nested = ts.select(np.arange(100, 200)).select([3, 50, 4])
    assert np.array_equal(nested.prompt_keys, full[[103, 150, 104]])
    assert np.array_equal(nested.lengths, ts.lengths[[103, 150, 104]])
    with pytest.raises(IndexError):
        ts.select([len(ts)])
    with pytest.raises(TypeError, match="row indices, not a mask"):
        ts.select(np.ones(len(ts), dtype=bool))


def test_a_missing_or_broken_set_is_named_with_the_setting_that_gave_it(tmp_path):
    from predictor.trace_sets import load_trace_sets

    with pytest.raises(FileNotFoundError, match=f"train_data: no trace dataset at {tmp_path / 'nope'}"):
        load_trace_sets([tmp_path / "nope"], "train_data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceFormatError, match=f"data.path: {tmp_path / 'empty'}: no {META_FILE}"):
        load_trace_sets([tmp_path / "empty"])


def test_sets_loaded_together_keep_the_optional_columns_they_share(tmp_path):
    from predictor.trace_sets import load_trace_sets

    gated = make_meta(gate_ahead=4)
    a = write_traces(tmp_path / "a", gated, make_records(3, gated)).path
    b = write_traces(tmp_path / "b", gated, make_records(2, gated, seed=1)).path
    plain = make_meta(has_weights=False)
    recs = make_records(2, plain, seed=2)
    for r in recs:
        r.weights = None
    c = write_traces(tmp_path / "c", plain, recs).path
    both = load_trace_sets([a, b])
    assert both.meta.gate_ahead == 4 and both.meta.has_weights and both.record(4).gate_ahead.shape[-1] == 4
    mixed = load_trace_sets([a, c])  # c has neither: the merged set has neither
    assert (mixed.meta.gate_ahead, mixed.meta.has_weights) == (0, False) and len(mixed) == 5
    assert mixed.record(0).gate_ahead is None and mixed.record(0).weights is None


def test_sets_of_different_models_are_not_merged(tmp_path):
    """Sets of one (L, E, k) but another architecture or layer map are refused; another model name of the same
    structure (a base model and its chat tune) is merged with a warning naming both."""
    from predictor.trace_sets import load_trace_sets

    meta = make_meta(num_layers=4)  # MoE layers 0, 1, 2 of 4
    a = write_traces(tmp_path / "a", meta, make_records(2, meta)).path
    for i, (field, value) in enumerate((("architecture", "qwen2_moe"), ("moe_layers", [1, 2, 3]), ("num_layers", 5))):
        other = make_meta(**{"num_layers": 4, field: value})
        b = write_traces(tmp_path / f"b{i}", other, make_records(2, other, seed=1)).path
        with pytest.raises(ValueError, match=f"has {field} .*not the same MoE model"):
            load_trace_sets([a, b])
    tuned = make_meta(num_layers=4)
    tuned.source_model = "someone/the-chat-tune"
    c = write_traces(tmp_path / "c", tuned, make_records(2, tuned, seed=2)).path
    with pytest.warns(UserWarning, match="the-chat-tune.*merged as one model's routing"):
        assert len(load_trace_sets([a, c])) == 4
