"""Inputs that used to pass or crash without naming the problem: token ids past int32, trace_meta.json values
of the wrong type, a bad weights row reported as row 0, reversed --moe-layers ranges, and prompt files with
non-object lines or clashing prompt ids. Each error names the file, row or line, and key."""

import json
import re

import numpy as np
import pyarrow as pa
import pytest
from test_traces import make_meta, make_records

from predictor.importers import Model, import_traces, parse_layers
from predictor.importers.__main__ import main as import_main
from predictor.prompts import load_prompts
from predictor.traces import (
    META_FILE,
    TOKEN_ID_MAX,
    TraceFormatError,
    TraceMeta,
    TraceRecord,
    load_traces,
    validate_record,
    write_traces,
)

# ------------------------------------------------------------------------------ token ids past int32


def test_token_ids_past_int32_are_refused_without_a_vocab_size(tmp_path):
    meta = make_meta(vocab_size=None, has_weights=False)
    rec = TraceRecord(7, np.array([1, TOKEN_ID_MAX + 1, 2]), np.tile([[0, 1]], (3, 3, 1)), 3)
    want = f"X: token id {TOKEN_ID_MAX + 1} out of range [0, {TOKEN_ID_MAX + 1}) at token 1 (int32"
    with pytest.raises(TraceFormatError, match=re.escape(want)):
        validate_record(rec, meta, "X")
    with pytest.raises(TraceFormatError, match=r"records: row 0 \(prompt_id=7\): token id 2147483648 out of range"):
        write_traces(tmp_path / "w", meta, [rec])
    assert not (tmp_path / "w").exists()
    rec.token_ids[1] = TOKEN_ID_MAX  # the largest id the column holds round-trips
    assert load_traces(write_traces(tmp_path / "ok", meta, [rec]).path).record(0).token_ids[1] == TOKEN_ID_MAX


def test_jsonl_import_without_vocab_size_refuses_a_wrapping_id(tmp_path):
    rows = [{"prompt_id": 0, "token_ids": [1, 2], "experts": [[[0, 1]], [[2, 3]]], "num_prefill": 2},
            {"prompt_id": 1, "token_ids": [1, 3_000_000_000], "experts": [[[0, 1]], [[2, 3]]], "num_prefill": 2}]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TraceFormatError, match=r"rows.jsonl: line 2 \(prompt_id=1\): token id 3000000000 out of range"):
        import_traces("jsonl", [src], tmp_path / "out", Model(tokenizer="tok", num_experts=4))
    assert not (tmp_path / "out").exists()
    with pytest.raises(TraceFormatError, match="key 'vocab_size' must be in"):
        make_meta(vocab_size=TOKEN_ID_MAX + 2).validate()


# ------------------------------------------------------------------------------ trace_meta.json value types


def meta_dict(**patch) -> dict:
    return {**make_meta().to_dict(), **patch}


@pytest.mark.parametrize("patch, why", [
    ({"moe_layers": 5}, "key 'moe_layers' must be a list of ints, got 5"),
    ({"moe_layers": ["0", "1", "2"]}, "key 'moe_layers' must be a list of ints, got ['0', '1', '2']"),
    ({"moe_layers": [0, True, 2]}, "key 'moe_layers' must be a list of ints"),
    ({"moe_layers": None}, "key 'moe_layers' must be a list of ints, got None"),
    ({"vocab_size": "50"}, "key 'vocab_size' must be an int or null, got '50'"),
    ({"num_experts": True}, "key 'num_experts' must be an int, got True"),
    ({"num_sequences": "3"}, "key 'num_sequences' must be an int, got '3'"),
    ({"tokenizer": 3}, "key 'tokenizer' must be a string or null, got 3"),
    ({"source_model": None}, "key 'source_model' must be a string, got None"),
    ({"recording": [1]}, "key 'recording' must be an object, got [1]"),
    ({"expert_shape": "big"}, "key 'expert_shape' must be an object or null, got 'big'"),
    ({"expert_shape": {"hidden": 4, "intermediate": 2, "bytes": "48"}}, "key 'expert_shape' bytes must be a positive int"),
    ({"has_weights": 1}, "key 'has_weights' must be true or false, got 1"),
    ({"num_shared_experts": -3}, "key 'num_shared_experts' must be an int >= 0, got -3"),
])
def test_meta_values_of_the_wrong_type_name_file_and_key(patch, why):
    with pytest.raises(TraceFormatError, match=re.escape(f"m/{META_FILE}: {why}")):
        TraceMeta.from_dict(meta_dict(**patch), f"m/{META_FILE}")


def test_a_bad_meta_file_is_named_on_load(tmp_path):
    path = write_traces(tmp_path / "t", make_meta(), make_records(3, make_meta())).path
    for raw, why in ((meta_dict(moe_layers=5), "key 'moe_layers' must be a list of ints"),
                     ([1, 2], "expected a JSON object, got list")):
        (path / META_FILE).write_text(json.dumps(raw))
        with pytest.raises(TraceFormatError, match=re.escape(f"{path / META_FILE}: {why}")):
            load_traces(path)


# ------------------------------------------------------------------------------ the bad weights row is named


def rewrite_weights(path, edit) -> None:
    """Edit the weights column of a written set's one shard as plain lists (a buggy writer)."""
    shard, = path.glob("data-*.arrow")
    with pa.memory_map(str(shard)) as f:
        table = pa.ipc.open_stream(f).read_all()
    i = table.schema.get_field_index("weights")
    w = table.column(i).combine_chunks()
    rows = w.storage.to_pylist()
    edit(rows)
    column = pa.ExtensionArray.from_storage(w.type, pa.array(rows, type=w.storage.type))
    table = table.set_column(i, table.schema.field(i), pa.chunked_array([column]))
    new = shard.with_suffix(".new")  # the table still maps the old file
    with pa.OSFile(str(new), "wb") as f, pa.ipc.new_stream(f, table.schema) as out:
        out.write_table(table)
    new.replace(shard)


def three_layers_at_token_1(rows, r):
    rows[r][1] = rows[r][1] + [rows[r][1][0]]


def three_weights_at_token_1(rows, r):
    rows[r][1][0] = rows[r][1][0] + [0.5]


@pytest.mark.parametrize("edit, row", [
    (lambda rows: three_layers_at_token_1(rows, 2), 2),
    (lambda rows: three_weights_at_token_1(rows, 2), 2),
    (lambda rows: (three_layers_at_token_1(rows, 3), three_weights_at_token_1(rows, 1)), 1),  # the first, not the coarser
    (lambda rows: rows[3].append(rows[3][0]), 3),
])
def test_a_bad_weights_row_is_named(tmp_path, edit, row):
    meta = make_meta()
    path = write_traces(tmp_path / "t", meta, make_records(5, meta)).path
    rewrite_weights(path, edit)
    with pytest.raises(TraceFormatError, match=re.escape(f"{path}: row {row}: weights shape")):
        load_traces(path)


# ------------------------------------------------------------------------------ --moe-layers


@pytest.mark.parametrize("spec", ["26-1", "1-3,7-5", "3--5", "-1", "", "1,,2", "a-3"])
def test_moe_layers_specs_that_name_no_increasing_range(spec):
    with pytest.raises(ValueError, match=re.escape(f"--moe-layers {spec!r}: ")):
        parse_layers(spec)


def test_moe_layers_specs_that_parse(tmp_path, capsys):
    assert parse_layers("1-3, 7,2") == [1, 2, 3, 7] and parse_layers("4-4") == [4]
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"prompt_id": 0, "token_ids": [1], "experts": [[[0, 1]]], "num_prefill": 1}))
    with pytest.raises(SystemExit):  # argparse's usage error, not an IndexError after the parse
        import_main(["jsonl", str(src), str(tmp_path / "o"), "--tokenizer", "x", "--num-experts", "4",
                     "--moe-layers", "27-26"])
    assert "'27-26' is not an index or a low-high range" in capsys.readouterr().err  # what is wrong, by name


# ------------------------------------------------------------------------------ prompt files


def prompts(tmp_path, *lines) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


@pytest.mark.parametrize("line", ['"the text prompt"', "5", '["text"]', "null"])
def test_a_prompt_line_that_is_not_an_object_names_file_and_line(tmp_path, line):
    path = prompts(tmp_path, {"text": "a"}, "", line)
    with pytest.raises(TypeError, match=re.escape(f"{path}: line 3: expected an object with the prompt text")):
        load_prompts(path)


@pytest.mark.parametrize("lines, why", [
    ([{"text": "a", "prompt_id": True}], "line 1: 'prompt_id' = True is not an integer prompt id"),
    ([{"text": "a", "prompt_id": 4}, {"text": "b", "prompt_id": 4}],
     "line 2: prompt id 4 is also the id of line 1; prompt ids must be unique"),
    ([{"text": "a"}, {"text": "b", "prompt_id": 0}],
     "line 2: prompt id 0 is also the id of line 1 (its row index: it has no 'prompt_id')"),
    ([{"text": "a", "prompt_id": 1}, {"text": "b"}],
     "line 2: prompt id 1 (its row index: it has no 'prompt_id') is also the id of line 1"),
])
def test_prompt_ids_are_integers_and_unique(tmp_path, lines, why):
    path = prompts(tmp_path, *lines)
    with pytest.raises((TypeError, ValueError), match=re.escape(f"{path}: {why}")):
        load_prompts(path)


def test_prompt_ids_from_rows_and_indices_that_do_not_clash(tmp_path):
    path = prompts(tmp_path, {"text": "a"}, {"text": "b", "prompt_id": 9}, {"text": "c"})
    assert load_prompts(path) == [(0, "a"), (9, "b"), (2, "c")]
    assert load_prompts(prompts(tmp_path, {"text": "a", "prompt_id": 1}, {"text": "b", "prompt_id": 1}),
                        id_field=None) == [(0, "a"), (1, "b")]
