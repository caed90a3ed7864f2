"""Validation on load (predictor/trace_checks.py): bad rows, files and directories give clear errors."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_traces import make_meta, make_records

from predictor import traces
from predictor.traces import META_FILE, TraceFormatError, load_traces, validate_record, write_traces

ROOT = Path(__file__).resolve().parents[1]


def write_unchecked(path, meta, recs, monkeypatch):
    """Write rows the writer would refuse (as a buggy or foreign writer could), then load normally."""
    with monkeypatch.context() as m:
        m.setattr(traces, "validate_record", lambda *a, **k: None)
        write_traces(path, meta, recs)
    return path


def writer_message(rec, meta) -> str:
    with pytest.raises(TraceFormatError) as err:
        validate_record(rec, meta, "X")
    return str(err.value).removeprefix("X: ")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.experts.__setitem__((1, 2, 0), 8), r"expert id 8 out of range \[0, 8\) at token 1, MoE layer 2"),
        (lambda r: r.experts.__setitem__((0, 1), [3, 3]), r"duplicate expert id in \[3, 3\] at token 0, MoE layer 1"),
        (lambda r: r.token_ids.__setitem__(2, 50), r"token id 50 out of range \[0, 50\) at token 2"),
        (lambda r: r.token_ids.__setitem__(1, -1), r"token id -1 out of range \[0, 50\) at token 1"),
        (lambda r: setattr(r, "num_prefill", 99), r"num_prefill = 99 outside \[0, \d+\]"),
        (lambda r: setattr(r, "num_prefill", -1), r"num_prefill = -1 outside"),
        (lambda r: setattr(r, "token_ids", r.token_ids[:-1]), r"mismatched lengths"),
        (lambda r: (setattr(r, "token_ids", r.token_ids[:0]), setattr(r, "experts", r.experts[:0]),
                    setattr(r, "weights", r.weights[:0]), setattr(r, "num_prefill", 0)), r"empty sequence"),
    ],
)
def test_load_refuses_bad_rows_with_the_writers_message(tmp_path, monkeypatch, mutate, message):
    meta = make_meta()
    recs = make_records(6, meta)
    mutate(recs[4])
    mutate(recs[5])  # the first bad row is named
    path = write_unchecked(tmp_path / "t", meta, recs, monkeypatch)
    with pytest.raises(TraceFormatError, match=message) as err:
        load_traces(path)
    assert str(err.value) == f"{path}: row 4: {writer_message(recs[4], meta)}"
    # the CLI says the same and exits non-zero
    res = subprocess.run([sys.executable, "-m", "predictor.traces", "validate", str(path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and str(err.value) in res.stderr
    assert len(load_traces(path, validate=False)) == 6  # `info` still reads it


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.gate_ahead.__setitem__((1, 2, 3), 8),
         r"gate_ahead expert id 8 out of range \[0, 8\) at token 1, MoE layer 2"),
        (lambda r: r.gate_ahead.__setitem__((0, 1, slice(0, 2)), 5),
         r"duplicate expert id in gate_ahead \[5, 5, \d, \d\] at token 0, MoE layer 1"),
        (lambda r: setattr(r, "gate_ahead", r.gate_ahead[:, :, :3]), r"gate_ahead shape \(\d+, 3, 3\) != "),
        (lambda r: setattr(r, "gate_ahead", r.gate_ahead[:-1]), r"gate_ahead shape"),
    ],
)
def test_gate_ahead_rows_are_checked_on_write_and_load(tmp_path, monkeypatch, mutate, message):
    meta = make_meta(gate_ahead=4)
    recs = make_records(6, meta)
    assert [r.gate_ahead.tolist() for r in load_traces(write_traces(tmp_path / "ok", meta, recs).path)] == [
        r.gate_ahead.tolist() for r in recs]  # fmt: skip
    mutate(recs[4])
    with pytest.raises(TraceFormatError, match=message):
        write_traces(tmp_path / "refused", meta, recs)
    assert not (tmp_path / "refused").exists()
    path = write_unchecked(tmp_path / "t", meta, recs, monkeypatch)
    if "shape" in message:  # the writer's message where the row reads back whole, else the vectorised check's
        with pytest.raises(TraceFormatError, match=re.escape(f"{path}: row 4: gate_ahead shape")):
            load_traces(path)
        return
    with pytest.raises(TraceFormatError, match=message) as err:
        load_traces(path)
    assert str(err.value) == f"{path}: row 4: {writer_message(recs[4], meta)}"


def test_a_bad_gate_value_before_a_bad_gate_shape_is_the_one_named(tmp_path, monkeypatch):
    meta = make_meta(gate_ahead=4)
    recs = make_records(6, meta)
    recs[2].gate_ahead[0, 0, 0] = 9
    recs[4].gate_ahead = recs[4].gate_ahead[:-1]
    path = write_unchecked(tmp_path / "t", meta, recs, monkeypatch)
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}: row 2: gate_ahead expert id 9 out of range")):
        load_traces(path)


def test_gate_ahead_meta_is_checked(tmp_path):
    with pytest.raises(TraceFormatError, match=r"key 'gate_ahead' must be 0 or in \[top_k, num_experts\] = \[2, 8\]"):
        make_meta(gate_ahead=1).validate()
    meta = make_meta()
    path = write_traces(tmp_path / "t", meta, make_records(2, meta)).path
    raw = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**raw, "gate_ahead": 4}))
    with pytest.raises(TraceFormatError, match=r"meta.gate_ahead = 4 but the gate_ahead column has shape None"):
        load_traces(path)


def test_load_accepts_good_rows_and_every_first_row(tmp_path, monkeypatch):
    """Across record batches: the row index is global, whichever batch the bad row is in."""
    meta = make_meta(has_weights=False)
    recs = make_records(30, meta)
    for r in recs:
        r.weights = None
    assert len(load_traces(write_traces(tmp_path / "ok", meta, recs).path)) == 30
    recs[23].experts[0, 0] = [5, 5]
    path = tmp_path / "bad"
    with monkeypatch.context() as m:
        m.setattr(traces, "validate_record", lambda *a, **k: None)
        import datasets

        real = datasets.Dataset.save_to_disk
        m.setattr(datasets.Dataset, "save_to_disk", lambda self, p, **kw: real(self, p, max_shard_size="1KB"))
        write_traces(path, meta, recs)
    assert len(list(path.glob("*.arrow"))) > 1
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}: row 23: duplicate expert id in [5, 5]")):
        load_traces(path)


def test_vocab_free_traces_still_refuse_negative_ids(tmp_path, monkeypatch):
    recs = make_records(3, make_meta())
    meta = make_meta(vocab_size=None)
    recs[1].token_ids[0] = -3
    path = write_unchecked(tmp_path / "t", meta, recs, monkeypatch)
    with pytest.raises(TraceFormatError, match=r"row 1: token id -3 out of range \[0, 2147483648\) at token 0"):
        load_traces(path)


@pytest.fixture
def good(tmp_path):
    meta = make_meta()
    return write_traces(tmp_path / "t", meta, make_records(4, meta)).path


def _shard(path: Path) -> Path:
    return next(path.glob("*.arrow"))


def test_zero_byte_shard(good):
    _shard(good).write_bytes(b"")
    with pytest.raises(TraceFormatError, match=re.escape(f"{_shard(good)}: zero-byte shard")):
        load_traces(good)


def test_truncated_shard(good):
    shard = _shard(good)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(TraceFormatError, match=re.escape(f"{shard}: truncated or corrupt Arrow shard")):
        load_traces(good)


def test_missing_shard(good):
    shard = _shard(good)
    shard.unlink()
    with pytest.raises(TraceFormatError, match=re.escape(f"{shard}: shard listed in state.json is missing")):
        load_traces(good)


def test_shard_with_fewer_rows_than_the_meta(good):
    meta = json.loads((good / META_FILE).read_text())
    (good / META_FILE).write_text(json.dumps({**meta, "num_sequences": 5}))
    with pytest.raises(TraceFormatError, match="4 rows but trace_meta.json says num_sequences = 5"):
        load_traces(good)


@pytest.mark.parametrize("content", [b'{"_data_files": [', b"\xff\xfe", b'{"_data_files": [{"name": 1}]}', b"[]"])
def test_corrupt_state_json(good, content):
    (good / "state.json").write_bytes(content)
    with pytest.raises(TraceFormatError, match=re.escape(f"{good / 'state.json'}: corrupt Arrow dataset state")):
        load_traces(good)


def test_corrupt_dataset_info(good):
    (good / "dataset_info.json").write_text("{bad")
    with pytest.raises(TraceFormatError, match="dataset_info.json: not valid JSON"):
        load_traces(good)


def test_non_utf8_meta(good):
    from predictor.data import read_meta

    (good / META_FILE).write_bytes(b"\xff{}")
    with pytest.raises(TraceFormatError, match="trace_meta.json: not valid JSON"):
        load_traces(good)
    (good / META_FILE).write_text("{bad")
    with pytest.raises(TraceFormatError, match=re.escape(f"{good / META_FILE}: not valid JSON")):
        read_meta(good)  # what training reads first
    (good / META_FILE).write_text("[" * 200_000)  # nested past the parser's recursion limit
    with pytest.raises(TraceFormatError, match="not valid JSON .RecursionError"):
        load_traces(good)


def test_columns_of_another_type_are_refused(good, tmp_path):
    """Float prompt ids (two prompts would be read as one: 0.2 and 0.7 both as 0) or prefill counts (cut)."""
    import datasets

    for column in ("prompt_id", "num_prefill"):
        ds = datasets.load_from_disk(str(good)).cast_column(column, datasets.Value("float64"))
        bad = tmp_path / f"float-{column}"
        ds.save_to_disk(str(bad))
        shutil.copy(good / META_FILE, bad / META_FILE)
        with pytest.raises(TraceFormatError, match=f"{column} column holds double, not integers"):
            load_traces(bad)


def test_plain_hf_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(TraceFormatError, match=r"no trace_meta.json: a saved Hugging Face dataset \(2 rows, columns \['text'\]\)"):
        load_traces(tmp_path / "plain")
    # with a trace meta copied in, the missing columns are named
    meta = make_meta()
    (tmp_path / "plain" / META_FILE).write_text(json.dumps(meta.to_dict()))
    with pytest.raises(TraceFormatError, match=r"missing trace columns \['prompt_id', 'token_ids', 'experts', "
                                               r"'num_prefill'\] \(columns: \['text'\]\)"):
        load_traces(tmp_path / "plain")


def test_zero_row_set(tmp_path):
    import datasets

    meta = make_meta(has_weights=False)
    feats = traces.features(meta)
    datasets.Dataset.from_dict({c: [] for c in feats}, features=feats).save_to_disk(str(tmp_path / "empty"))
    (tmp_path / "empty" / META_FILE).write_text(json.dumps(meta.to_dict()))
    with pytest.raises(TraceFormatError, match="no rows \\(an empty trace set\\)"):
        load_traces(tmp_path / "empty")


def test_datamodule_and_stats_validate_on_load(tmp_path, monkeypatch):
    """train.py (through the DataModule), evaluate.py and predictor.stats all load through load_traces."""
    from predictor.data import TraceDataModule
    from predictor.stats import main as stats_main

    meta = make_meta()
    recs = make_records(6, meta)
    recs[3].experts[2, 1] = [1, 1]
    path = write_unchecked(tmp_path / "t", meta, recs, monkeypatch)
    dm = TraceDataModule(str(path), window=8, context=2, batch_tokens=16)
    with pytest.raises(TraceFormatError, match="row 3: duplicate expert id in \\[1, 1\\] at token 2, MoE layer 1"):
        dm.setup()
    with pytest.raises(TraceFormatError, match="row 3: duplicate expert id"):
        stats_main([str(path), "--no-baselines"])
    assert np.all(load_traces(path, validate=False).lengths > 0)


def test_non_utf8_prompt_files_name_file_and_line(tmp_path):
    from predictor.prompts import load_prompts

    txt = tmp_path / "p.txt"
    txt.write_bytes("first\nsecond\nthird \xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{txt}: line 3: not UTF-8 text (byte 0xe9 at offset 19)")):
        load_prompts(str(txt))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\n\n{"text": "b\xff"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}: line 3: not UTF-8 text")):
        load_prompts(str(jsonl))
    jsonl.write_bytes(b'{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}: line 2: not JSON")):
        load_prompts(str(jsonl))
    with pytest.raises(FileNotFoundError, match="prompts: no file at"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_non_utf8_csv_member_names_member_and_line(tmp_path):
    import io
    import tarfile

    from test_moebeyond import csv_text, good_member

    from predictor.moebeyond import import_moebeyond

    text = csv_text(*good_member(3)).encode()
    lines = text.split(b"\n")
    lines[2] = lines[2].replace(b"Hello", b"Hel\xfflo")
    assert lines[2] != text.split(b"\n")[2]
    with tarfile.open(tmp_path / "csv.tar.xz", "w:xz") as tar:
        for name, data in (("csv/prompt_1_data.csv", text), ("csv/prompt_2_data.csv", b"\n".join(lines))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(TraceFormatError, match=r"csv.tar.xz:csv/prompt_2_data.csv: line 3: not UTF-8 text"):
        import_moebeyond(tmp_path / "csv.tar.xz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["/no/such/model", "data/demo/modelx", "./modelx", "~/x/y"])
def test_collect_names_a_missing_model_path(tmp_path, model):
    from integrate.collect_job import collect

    cfg = {"model": model, "prompts": "unused", "out": str(tmp_path / "o")}
    with pytest.raises(FileNotFoundError, match=re.escape(f"model={model}: no such directory")):
        collect(cfg)
    with pytest.raises(FileNotFoundError, match=re.escape(f"tokenizer={model}: no such directory")):
        collect({**cfg, "model": str(ROOT / "data" / "demo" / "model"), "tokenizer": model})


def _hand_built(path: Path, rows: list[dict], experts_dtype: str = "uint8", token_dtype: str = "int32") -> Path:
    """A trace directory written with arbitrary Arrow features (a foreign or hand-built file)."""
    import datasets

    feats = {"prompt_id": datasets.Value("int64"), "token_ids": datasets.Sequence(datasets.Value(token_dtype)),
             "experts": datasets.Array3D(shape=(None, 2, 2), dtype=experts_dtype), "num_prefill": datasets.Value("int32")}
    datasets.Dataset.from_list(rows, features=datasets.Features(feats)).save_to_disk(str(path))
    meta = traces.TraceMeta(source_model="toy", architecture="toy", num_layers=2, moe_layers=[0, 1], num_experts=8,
                            top_k=2, vocab_size=100, num_sequences=len(rows),
                            num_tokens=sum(len(r["token_ids"]) for r in rows))  # fmt: skip
    (path / META_FILE).write_text(json.dumps(meta.to_dict()))
    return path


EX = [[[1, 2], [3, 4]]] * 3


@pytest.mark.parametrize("row, column", [({"token_ids": [5, None, 7], "experts": EX}, "token_ids"),
                                         ({"token_ids": [5, 6, 7], "experts": [[[1, None], [3, 4]]] + EX[1:]}, "experts")])
def test_a_null_inside_a_rows_lists_is_named(tmp_path, row, column):
    """Read as NaN, a null inside a row's lists would pass every range check; it is named with its row."""
    good = {"prompt_id": 0, "token_ids": [1, 2, 3], "experts": EX, "num_prefill": 3}
    path = _hand_built(tmp_path / "t", [good, {"prompt_id": 1, "num_prefill": 3, **row}])
    with pytest.raises(TraceFormatError, match=rf"row 1: missing value inside column '{column}'"):
        load_traces(path)


def test_float_ids_are_refused_not_truncated(tmp_path):
    """Stored floats would be cut to ids silently (2.7 -> 2); the load and the writer both refuse them."""
    rows = [{"prompt_id": 0, "token_ids": [5.9, 6.5, 7.0], "experts": [[[1.0, 2.7], [3.0, 4.0]]] * 3, "num_prefill": 3}]
    with pytest.raises(TraceFormatError, match="experts column holds float32, not integer expert ids"):
        load_traces(_hand_built(tmp_path / "e", rows, experts_dtype="float32", token_dtype="float32"))
    with pytest.raises(TraceFormatError, match="token_ids column holds list<item: float"):
        load_traces(_hand_built(tmp_path / "t", rows, token_dtype="float32"))
    meta = make_meta()
    recs = make_records(2, meta)
    recs[0].experts = recs[0].experts.astype(np.float64) + 0.5
    with pytest.raises(TraceFormatError, match=r"row 0 .*experts hold float64 values, not integer ids"):
        write_traces(tmp_path / "w", meta, recs)


def test_a_shard_with_undecodable_schema_names_is_named(good):
    """One byte of a column name turned invalid UTF-8: named as a corrupt shard, not a UnicodeDecodeError."""
    shard = _shard(good)
    data = bytearray(shard.read_bytes())
    at = data.index(b"\t\x00\x00\x00prompt_id")  # the schema's field name (length 9, then its bytes)
    data[at + 5] = 0xCC
    shard.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match=r"truncated or corrupt Arrow shard \(UnicodeDecodeError"):
        load_traces(good)


def test_a_corrupt_shard_is_an_error_naming_it_not_a_crash(tmp_path):
    """One byte flipped in a shard's offsets (found by fuzzing: two of ~120 flips) once crashed the process
    (SIGSEGV) while the load decoded the row it had found bad; Arrow's full validation finds it first. Loaded in
    a subprocess, so a crash fails the test rather than the run."""
    from synthetic import random_traces

    random_traces(tmp_path / "src", num_layers=3, num_experts=8, top_k=2, vocab_size=50, n_prompts=40, lengths=(2, 6))
    shard = next((tmp_path / "src").glob("data-*.arrow"))
    data = shard.read_bytes()
    for pos in (1992, 4276):
        bad = tmp_path / f"flip{pos}"
        shutil.copytree(tmp_path / "src", bad)
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        (bad / shard.name).write_bytes(bytes(flipped))
        code = f"from predictor.traces import load_traces; load_traces({str(bad)!r})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).parents[1])  # fmt: skip
        assert r.returncode == 1 and f"{bad}: rows 0..39: corrupt Arrow data" in r.stderr, (pos, r.returncode, r.stderr[-300:])


def test_prompt_ids_must_fit_the_int64_column():
    """A prompt id of 2^63 overflowed inside the datasets writer (an error naming no row); a negative one
    was kept. Both are refused by the row check, naming the row."""
    meta = make_meta()
    rec = make_records(1, meta)[0]
    for bad in (2**63, -5, 1.5):
        rec.prompt_id = bad
        with pytest.raises(TraceFormatError, match=re.escape(f"row 7: prompt_id = {bad!r} is not an integer in [0, 2^63)")):
            validate_record(rec, meta, "row 7")
