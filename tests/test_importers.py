"""Engine and generic importers (predictor/importers/): files built by hand from the documented formats
(neither vLLM nor SGLang runs here), exact round trips, and errors that name the file and line/row/record."""

import base64
import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from predictor.importers import Model, import_traces
from predictor.importers.__main__ import main
from predictor.token_space import tokenizer_space
from predictor.traces import TraceFormatError, TraceRecord, load_traces
from tools.vllm_client import (
    encode_npy,
    header,
    row_from_completion_choice,
    rows_from_request_output,
    write_output,
)

E, K = 8, 2
TOK = "org/moe-model"


def routing(rng, T, L, E=E, k=K):
    return np.argsort(rng.random((T, L, E)), axis=-1)[..., :k]


def generic_rows(n=4, L=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n):
        T = int(rng.integers(2, 9))
        out.append(TraceRecord(10 + p, rng.integers(0, 100, T), routing(rng, T, L), int(rng.integers(1, T + 1))))
    return out


def as_dict(r: TraceRecord) -> dict:
    return {"prompt_id": r.prompt_id, "token_ids": r.token_ids.tolist(), "experts": r.experts.tolist(),
            "num_prefill": r.num_prefill, "text": "ignored"}


def assert_same(ts, want):
    assert len(ts) == len(want)
    for got, w in zip(ts, want):
        assert got.prompt_id == w.prompt_id and got.num_prefill == w.num_prefill
        np.testing.assert_array_equal(got.token_ids, w.token_ids)
        np.testing.assert_array_equal(got.experts, w.experts)


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ------------------------------------------------------------------------------ the generic format


def test_jsonl_and_parquet_round_trip(tmp_path):
    rows = generic_rows()
    src = write_jsonl(tmp_path / "rows.jsonl", [as_dict(r) for r in rows[:2]] + [""] + [as_dict(r) for r in rows[2:]])
    main(["jsonl", str(src), str(tmp_path / "j"), "--tokenizer", TOK, "--num-experts", str(E), "--moe-layers", "1-3"])
    ts = load_traces(tmp_path / "j")
    assert_same(ts, rows)
    m = ts.meta
    assert (m.moe_layers, m.num_layers, m.top_k, m.num_experts) == ([1, 2, 3], 4, K, E)
    assert m.token_space == tokenizer_space(TOK) and m.tokenizer == TOK and m.recording["engine"] == "jsonl"
    pq.write_table(pa.Table.from_pylist([as_dict(r) for r in rows]), tmp_path / "rows.parquet", row_group_size=3)
    pts = import_traces("parquet", [tmp_path / "rows.parquet"], tmp_path / "p", Model(TOK, num_experts=E), limit=3)
    assert_same(pts, rows[:3])
    assert pts.meta.moe_layers == [0, 1, 2] and pts.meta.recording["limit"] == 3
    assert m.vocab_size is None  # a tokenizer that cannot be read here leaves the ids unchecked
    # one that can be read sizes the id space: an id past it is refused by file and row
    big = replace(rows[0], token_ids=rows[0].token_ids + 5000)
    with pytest.raises(TraceFormatError, match=r"rows\.jsonl.*token id \d+ out of range \[0, 3072\)"):
        main(["jsonl", str(write_jsonl(tmp_path / "rows.jsonl", [as_dict(big)])), str(tmp_path / "big"),
              "--tokenizer", "data/demo/model", "--num-experts", str(E), "--moe-layers", "1-3"])


@pytest.mark.parametrize("line, why", [
    ("{not json", "line 2: not a line of JSON"),
    ('{"prompt_id": 1, "token_ids": [1]}', r"line 2: missing keys \['experts', 'num_prefill'\]"),
    ('{"prompt_id": 1, "token_ids": [1, 2], "experts": [[[0, 1]], [[0]]], "num_prefill": 1}', "line 2: experts must be a rectangular"),
    ('{"prompt_id": "a", "token_ids": [1], "experts": [[[0, 1]]], "num_prefill": 1}', "line 2: prompt_id = 'a'"),
    ('{"prompt_id": 1, "token_ids": [1], "experts": [[[0, 9]]], "num_prefill": 1}', r"line 2 \(prompt_id=1\): expert id 9 out of range"),
    ('{"prompt_id": 1, "token_ids": [1], "experts": [[[3, 3]]], "num_prefill": 1}', "line 2 .*duplicate expert id"),
    ('{"prompt_id": 1, "token_ids": [1], "experts": [[[0, 1], [2, 3]]], "num_prefill": 1}', "line 2 .*ragged layers"),
    ('{"prompt_id": 1, "token_ids": [1, 2], "experts": [[[0, 1]]], "num_prefill": 1}', "line 2 .*mismatched lengths"),
    ('{"prompt_id": 1, "token_ids": [1], "experts": [[[0, 1]]], "num_prefill": 5}', "line 2 .*num_prefill = 5"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, why):
    good = '{"prompt_id": 0, "token_ids": [5], "experts": [[[1, 2]]], "num_prefill": 1}'
    src = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(TraceFormatError, match=f"bad.jsonl: {why}"):
        import_traces("jsonl", [src], tmp_path / "out", Model(TOK, num_experts=E))
    assert not (tmp_path / "out").exists()


def test_generic_files_that_are_not_what_they_claim(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt_id": 0}\n\xff\xfe\n')
    with pytest.raises(TraceFormatError, match="b.jsonl: line 1: missing keys"):
        import_traces("jsonl", [tmp_path / "b.jsonl"], tmp_path / "o", Model(TOK, num_experts=E))
    (tmp_path / "c.jsonl").write_bytes(b"\xff\xfe\n")
    with pytest.raises(TraceFormatError, match="c.jsonl: line 1: not UTF-8"):
        import_traces("jsonl", [tmp_path / "c.jsonl"], tmp_path / "o", Model(TOK, num_experts=E))
    with pytest.raises(ValueError, match="--num-experts"):
        import_traces("jsonl", [write_jsonl(tmp_path / "d.jsonl", [as_dict(generic_rows(1)[0])])], tmp_path / "o",
                      Model(TOK))
    pq.write_table(pa.table({"prompt_id": [0], "token_ids": [[1]]}), tmp_path / "m.parquet")
    with pytest.raises(TraceFormatError, match=r"m.parquet: missing columns \['experts', 'num_prefill'\]"):
        import_traces("parquet", [tmp_path / "m.parquet"], tmp_path / "o", Model(TOK, num_experts=E))
    rows = [as_dict(r) for r in generic_rows(3)]
    rows[2]["experts"][0][0] = [E, 0]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    with pytest.raises(TraceFormatError, match=r"r.parquet: row 2 \(prompt_id=12\): expert id 8 out of range"):
        import_traces("parquet", [tmp_path / "r.parquet"], tmp_path / "o", Model(TOK, num_experts=E))
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TraceFormatError, match="x.parquet: not a readable Parquet file"):
        import_traces("parquet", [tmp_path / "x.parquet"], tmp_path / "o", Model(TOK, num_experts=E))


# ------------------------------------------------------------------------------ vLLM

N_LAYERS, DENSE = 4, [0]  # decoder layer 0 is dense: vLLM leaves its rows at 0
GEO = {"num_layers": N_LAYERS, "num_experts": E, "top_k": K, "architecture": "deepseek_v2", "vocab_size": 100}


def vllm_completion(rng, P, G):
    """What vLLM returns for one completion: routing of prompt + generated - 1 tokens, every decoder layer."""
    routed = np.zeros((P + G - 1, N_LAYERS, K), dtype=np.int32)
    routed[:, 1:] = routing(rng, P + G - 1, N_LAYERS - 1)
    return rng.integers(0, 100, P).tolist(), rng.integers(0, 100, G).tolist(), routed


def test_vllm_client_output_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    p0, g0, r0 = vllm_completion(rng, 5, 3)
    _, g1, r1 = vllm_completion(rng, 5, 1)  # a second sample of the same prompt: n=2
    engine = SimpleNamespace(prompt_token_ids=p0, outputs=[
        SimpleNamespace(token_ids=g0, routed_experts=r0, finish_reason="length"),
        SimpleNamespace(token_ids=g1, routed_experts=r1, finish_reason="stop")])
    rows = rows_from_request_output(7, engine)  # what LLM.generate returns
    p2, g2, r2 = vllm_completion(rng, 6, 4)
    choice = {"prompt_token_ids": p2, "token_ids": g2, "routed_experts": encode_npy(r2), "finish_reason": "length"}
    rows.append(row_from_completion_choice(9, choice))  # a /v1/completions response
    out = write_output(tmp_path / "routed.jsonl", header("org/m", TOK, GEO, "llm", {"max_tokens": 4}), rows)
    main(["vllm", str(out), str(tmp_path / "t"), "--tokenizer", TOK])
    ts = load_traces(tmp_path / "t")
    want = [TraceRecord(pid, np.array(p + g)[: len(r)], r[:, 1:], len(p))
            for pid, p, g, r in ((7, p0, g0, r0), (7, p0, g1, r1), (9, p2, g2, r2))]
    assert_same(ts, want)
    m = ts.meta
    assert (m.moe_layers, m.num_layers, m.num_experts, m.top_k) == ([1, 2, 3], N_LAYERS, E, K)
    assert (m.architecture, m.vocab_size, m.source_model, m.token_space) == ("deepseek_v2", 100, "org/m",
                                                                            tokenizer_space(TOK))
    # the same tokenizer name as collect.py's: one token space
    demo = load_traces("data/demo/traces").meta.token_space
    main(["vllm", str(out), str(tmp_path / "d"), "--tokenizer", "./data/demo/model/", "--limit", "1"])
    assert load_traces(tmp_path / "d").meta.token_space == demo and len(load_traces(tmp_path / "d")) == 1


def _vllm_file(tmp_path, mutate):
    rng = np.random.default_rng(2)
    rows = []
    for pid in range(3):
        p, g, r = vllm_completion(rng, 4, 3)
        rows.append({"prompt_id": pid, "prompt_token_ids": p, "output_token_ids": g, "routed_experts": encode_npy(r)})
    head = header("org/m", TOK, GEO, "server", {})
    mutate(head, rows)
    return write_output(tmp_path / "v.jsonl", head, rows)


@pytest.mark.parametrize("mutate, why", [
    (lambda h, r: h.update(format="other"), "line 1: expected a header"),
    (lambda h, r: h.update(routed_experts_prompt_start=-3), "line 1: routed_experts_prompt_start = -3 is not a token"),
    (lambda h, r: h.update(routed_experts_prompt_start="x"), "line 1: routed_experts_prompt_start = 'x' is not a token"),
    (lambda h, r: h.update(geometry=[1]), r"line 1: geometry \[1\] is not an object of integer sizes"),
    (lambda h, r: h.update(geometry={**h["geometry"], "num_layers": "2"}), "line 1: geometry .* is not an object of integer"),
    (lambda h, r: r[1].update(routed_experts=None), "line 3: routed_experts is null: start vLLM with --enable-return"),
    (lambda h, r: r[1].update(routed_experts="not base64!"), "line 3: routed_experts is not base64"),
    (lambda h, r: r[2].update(output_token_ids=[1]), "line 4: routed_experts covers 6 tokens"),
    (lambda h, r: r[1].pop("prompt_token_ids"), r"line 3: missing keys \['prompt_token_ids'\]"),
    (lambda h, r: r[2].update(routed_experts=encode_npy(np.ones((6, N_LAYERS, K), dtype=np.int32) * [0, 1])),
     "line 4: layer 0 holds routing but was taken as dense"),
    (lambda h, r: r[0].update(routed_experts=encode_npy(np.zeros((6, N_LAYERS, K), dtype=np.int32))),
     "line 2: every layer holds only the filler"),
])
def test_vllm_errors_name_the_line(tmp_path, mutate, why):
    src = _vllm_file(tmp_path, mutate)
    with pytest.raises(TraceFormatError, match=f"v.jsonl: {why}"):
        import_traces("vllm", [src], tmp_path / "out", Model(TOK))


def test_vllm_routed_experts_never_unpickle(tmp_path):
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # an object array: needs pickle
    src = _vllm_file(tmp_path, lambda h, r: r[0].update(routed_experts=base64.b64encode(buf.getvalue()).decode()))
    with pytest.raises(TraceFormatError, match="line 2: routed_experts is not base64 of an .npy array"):
        import_traces("vllm", [src], tmp_path / "out", Model(TOK))  # np.load(allow_pickle=False) refuses it


# ------------------------------------------------------------------------------ SGLang

S_LAYERS, S_E, PHYS = 3, 4, 6  # decoder layer 0 dense; logical experts 0, 1 have a second physical slot
P2L = torch.tensor([[0, 1, 2, 3, 0, 1]] * S_LAYERS)


def sglang_pass(rng, ids, positions, lens, mode, rids=None, rank=0, fid=0):
    """A per_token record as SGLang writes it, and the logical routing it stands for (n, 2 MoE layers, k)."""
    n = len(ids)
    logical = routing(rng, n, S_LAYERS - 1, S_E, K)
    physical = np.where((logical < 2) & (rng.random(logical.shape) < 0.5), logical + 4, logical)  # a replica
    topk = torch.full((S_LAYERS, n, 8), -1, dtype=torch.int32)
    topk[1:, :, :K] = torch.from_numpy(physical.transpose(1, 0, 2).astype(np.int32))
    rec = {"forward_pass_id": fid, "rank": rank, "gatherer_key": "primary", "input_ids": list(ids),
           "positions": list(positions), "extend_seq_lens": lens, "forward_mode": mode, "topk_ids_of_layer": topk,
           "misc_objects": [], "global_physical_count": torch.zeros(S_LAYERS, PHYS, dtype=torch.int32)}
    if rids is not None:
        rec["rids"] = rids
    return rec, logical


def save_dump(path, records):
    torch.save({"records": records, "last_physical_to_logical_map": P2L}, path)
    return path


def test_sglang_passes_become_sequences(tmp_path):
    rng = np.random.default_rng(3)
    # A: prompt 3 + 3 decode; B: prompt 2 + 1 decode (finishes); C: prompt 4 in two chunks, then decode in a mixed pass
    plan = [([10, 11, 12, 20, 21], [0, 1, 2, 0, 1], [3, 2], 1, ["a", "b"]),
            ([13, 22], [3, 2], None, 2, ["a", "b"]),
            ([30, 31], [0, 1], [2], 1, ["c"]),
            ([32, 33, 14], [2, 3, 4], [2, 1], 3, ["c", "a"]),  # mixed: C's second chunk + A's decode token
            ([15, 34], [5, 4], None, 2, ["a", "c"])]
    recs, logical = zip(*[sglang_pass(rng, *p[:4], rids=p[4], fid=i) for i, p in enumerate(plan)])
    noise, _ = sglang_pass(rng, [99], [0], [1], 1, rids=["z"], rank=1)  # another rank's pass
    save_dump(tmp_path / "expert_distribution_recorder_1.0_0.pt", [*recs[:3], noise])
    save_dump(tmp_path / "expert_distribution_recorder_2.0_0.pt", list(recs[3:]))
    allex = np.concatenate(logical)  # tokens in pass order: A's are 0-2, 5, 11, 12; B's 3, 4, 6; C's 7-10, 13
    idx = {"a": [0, 1, 2, 5, 11, 12], "b": [3, 4, 6], "c": [7, 8, 9, 10, 13]}
    want = [TraceRecord(0, np.array([10, 11, 12, 13, 14, 15]), allex[idx["a"]], 3),
            TraceRecord(1, np.array([20, 21, 22]), allex[idx["b"]], 2),
            TraceRecord(2, np.array([30, 31, 32, 33, 34]), allex[idx["c"]], 4)]
    with pytest.raises(TraceFormatError, match=r"records from ranks \[0, 1\]; import one rank at a time"):
        import_traces("sglang", [tmp_path], tmp_path / "t", Model(TOK))  # both ranks: every sequence twice
    main(["sglang", str(tmp_path), str(tmp_path / "t"), "--tokenizer", TOK, "--rank", "0"])
    ts = load_traces(tmp_path / "t")
    assert_same(ts, want)
    assert (ts.meta.moe_layers, ts.meta.num_layers, ts.meta.num_experts, ts.meta.top_k) == ([1, 2], 3, S_E, K)
    for rec in recs:  # without request ids the positions link them just as well here
        del rec["rids"]
    save_dump(tmp_path / "expert_distribution_recorder_1.0_0.pt", list(recs[:3]))
    save_dump(tmp_path / "expert_distribution_recorder_2.0_0.pt", list(recs[3:]))
    assert_same(import_traces("sglang", [tmp_path], tmp_path / "n", Model(TOK)), want)
    for rec in recs:  # nor forward pass ids: the files' order, then the records', is the passes' order
        del rec["forward_pass_id"]
    save_dump(tmp_path / "expert_distribution_recorder_1.0_0.pt", list(recs[:3]))
    save_dump(tmp_path / "expert_distribution_recorder_2.0_0.pt", list(recs[3:]))
    assert_same(import_traces("sglang", [tmp_path], tmp_path / "f", Model(TOK)), want)


def test_sglang_one_pass_id_in_two_files_is_two_runs_and_refused(tmp_path):
    rng = np.random.default_rng(8)
    first, _ = sglang_pass(rng, [1, 2], [0, 1], [2], 1, rids=["a"])
    again, _ = sglang_pass(rng, [5, 6], [0, 1], [2], 1, rids=["b"])  # a restarted server counts from 0 again
    save_dump(tmp_path / "run1.pt", [first])
    save_dump(tmp_path / "run2.pt", [again])
    with pytest.raises(TraceFormatError, match=r"run2.pt: record 0: forward_pass_id 0 also in .*run1.pt \(record 0\)"):
        import_traces("sglang", [tmp_path], tmp_path / "o", Model(TOK))


def test_sglang_mixed_pass_one_token_prompt_is_a_new_sequence(tmp_path):
    """In a mixed pass a one-token request at position 0 starts a sequence; one further on continues one."""
    rng = np.random.default_rng(7)
    prefill, lp = sglang_pass(rng, [1, 2], [0, 1], [2], 1, rids=["a"])
    mixed, lm = sglang_pass(rng, [3, 9], [2, 0], [1, 1], 3, rids=["a", "b"], fid=1)  # a's decode, b's prompt
    ts = import_traces("sglang", [save_dump(tmp_path / "m.pt", [prefill, mixed])], tmp_path / "o", Model(TOK))
    assert_same(ts, [TraceRecord(0, np.array([1, 2, 3]), np.concatenate([lp, lm[:1]]), 2),
                     TraceRecord(1, np.array([9]), lm[1:], 1)])


def test_sglang_ambiguous_sequences_need_ids_or_batch_order(tmp_path):
    rng = np.random.default_rng(4)
    prefill, lp = sglang_pass(rng, [1, 2, 5, 6], [0, 1, 0, 1], [2, 2], 1)
    step, ls = sglang_pass(rng, [3, 7], [2, 2], None, 2, fid=1)
    src = save_dump(tmp_path / "d.pt", [prefill, step])
    with pytest.raises(TraceFormatError, match="d.pt: record 1, request 0 of the batch: 2 sequences have length 2"):
        import_traces("sglang", [src], tmp_path / "o", Model(TOK))
    ts = import_traces("sglang", [src], tmp_path / "o", Model(TOK), by_order=True)
    assert_same(ts, [TraceRecord(0, np.array([1, 2, 3]), np.concatenate([lp[:2], ls[:1]]), 2),
                     TraceRecord(1, np.array([5, 6, 7]), np.concatenate([lp[2:], ls[1:]]), 2)])


def test_sglang_malformed_dumps(tmp_path):
    rng = np.random.default_rng(5)
    rec, _ = sglang_pass(rng, [1, 2], [0, 1], [2], 1)
    torch.save({"records": [rec]}, tmp_path / "a.pt")
    with pytest.raises(TraceFormatError, match="a.pt: expected a per_token dump"):
        import_traces("sglang", [tmp_path / "a.pt"], tmp_path / "o", Model(TOK))
    bad = dict(rec, topk_ids_of_layer=rec["topk_ids_of_layer"].clone())
    bad["topk_ids_of_layer"][2, 1, K] = 3  # a third id where -1 padding belongs
    with pytest.raises(TraceFormatError, match="b.pt: record 1: token 1, MoE layer 1: .* is not 2 ids"):
        import_traces("sglang", [save_dump(tmp_path / "b.pt", [rec, dict(bad, forward_pass_id=1)])], tmp_path / "o",
                      Model(TOK))
    with pytest.raises(TraceFormatError, match=r"c.pt: record 0: missing keys \['positions'\]"):
        import_traces("sglang", [save_dump(tmp_path / "c.pt", [{k: v for k, v in rec.items() if k != "positions"}])],
                      tmp_path / "o", Model(TOK))
    late, _ = sglang_pass(rng, [7, 8], [5, 6], [2], 1)
    with pytest.raises(TraceFormatError, match="d.pt: record 0, request 0 of the batch: no open sequence of length 5"):
        import_traces("sglang", [save_dump(tmp_path / "d.pt", [late])], tmp_path / "o", Model(TOK))
    (tmp_path / "e.pt").write_bytes(b"\x80\x04truncated")
    with pytest.raises(TraceFormatError, match="e.pt: "):
        import_traces("sglang", [tmp_path / "e.pt"], tmp_path / "o", Model(TOK))
    torch.save({"records": [], "last_physical_to_logical_map": P2L, "x": SimpleNamespace(a=1)}, tmp_path / "f.pt")
    with pytest.raises(TraceFormatError, match="f.pt: refused: not a plain torch file"):
        import_traces("sglang", [tmp_path / "f.pt"], tmp_path / "o", Model(TOK))
    empty = dict(rec, extend_seq_lens=[0, 2])  # a zero-length request (an IndexError once)
    with pytest.raises(TraceFormatError, match=r"g.pt: record 0: extend_seq_lens \[0, 2\] are not request lengths >= 1"):
        import_traces("sglang", [save_dump(tmp_path / "g.pt", [empty])], tmp_path / "o", Model(TOK))
    named = dict(rec, forward_mode="EXTEND")  # the mode's name, not its value
    with pytest.raises(TraceFormatError, match="h.pt: record 0: forward_mode 'EXTEND' is not SGLang's integer mode"):
        import_traces("sglang", [save_dump(tmp_path / "h.pt", [named])], tmp_path / "o", Model(TOK))


def test_vllm_client_against_a_stand_in_server(tmp_path):
    """The client's server mode: what it asks /v1/completions for, and a file the importer reads back."""
    import http.server
    import threading

    from tools.vllm_client import main as client_main

    p, g, r = vllm_completion(np.random.default_rng(6), 3, 2)
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            choice = {"index": 0, "text": "", "prompt_token_ids": p, "token_ids": g, "routed_experts": encode_npy(r),
                      "finish_reason": "length"}
            out = json.dumps({"choices": [choice]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "p.txt").write_text("hi there\n")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": N_LAYERS, "n_routed_experts": E,
                                                      "num_experts_per_tok": K, "model_type": "deepseek_v2"}))
    try:
        client_main(["--server", f"http://127.0.0.1:{server.server_port}", "--model", "org/m", "--prompts",
                     str(tmp_path / "p.txt"), "--out", str(tmp_path / "o.jsonl"), "--hf-config",
                     str(tmp_path / "config.json"), "--max-tokens", "2"])
    finally:
        server.shutdown()
    path, body = seen[0]
    assert path == "/v1/completions" and body["return_token_ids"] is True and body["prompt"] == "hi there"
    ts = import_traces("vllm", [tmp_path / "o.jsonl"], tmp_path / "t", Model(TOK))
    assert_same(ts, [TraceRecord(0, np.array(p + g)[: len(r)], r[:, 1:], 3)])
    assert (ts.meta.architecture, ts.meta.num_experts, ts.meta.moe_layers) == ("deepseek_v2", E, [1, 2, 3])
