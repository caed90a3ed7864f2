"""Recording: ids are the dispatched ones, padding is invisible, generation rows align token for token."""

import functools

import numpy as np
import pytest
import torch
from tiny_models import ARCHITECTURES, EOS_ID, PAD_ID, tiny_moe_model, tiny_tokenizer

from integrate.adapters import get_adapter, trace_meta_for
from integrate.record import RoutingRecorder, encode_prompts, record_batch, record_prompts, recording_overhead
from integrate.runtime.gate import gate_picks
from predictor.traces import load_traces, write_traces

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19], [20]]


@functools.cache
def model(arch: str):
    return tiny_moe_model(arch)


def router_outputs(m, ids):
    """Independent check: the index each router returns, captured by forward hooks on the routers."""
    ad = get_adapter(m)
    seen, handles = [], []
    for layer in ad.spec(m).moe_layers:
        hook = lambda mod, args, out: seen.append((out[1].detach(), out[2].detach()))
        handles.append(ad.router_module(m, layer).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = m(ids, output_router_logits=True).router_logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recorded_ids_are_the_dispatched_ids(arch):
    m = model(arch)
    ids = torch.tensor([PROMPTS[0]])
    with RoutingRecorder(m) as rec, torch.no_grad():
        m(ids)
        ((experts, weights, _),) = rec.take()
    routed, logits = router_outputs(m, ids)
    assert experts.shape == (ids.numel(), len(routed), 2)
    for j, (w, idx) in enumerate(routed):
        assert torch.equal(experts[:, j], idx) and torch.equal(weights[:, j], w.float())
    if arch == "deepseek_v3":
        # group limits + correction bias: a top-k of the logits is not what was routed
        naive = torch.stack([lg.topk(2).indices.sort().values for lg in logits], 1)
        assert not torch.equal(naive, experts.sort(-1).values)
    if arch == "olmoe":  # plain softmax top-k: output_router_logits agrees
        naive = torch.stack([lg.topk(2).indices.sort().values for lg in logits], 1)
        assert torch.equal(naive, experts.sort(-1).values)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padded_batch_equals_unbatched(arch, side):
    m = model(arch)
    batched = record_batch(m, PROMPTS, pad_id=PAD_ID, padding_side=side)
    for seq, (tokens, experts, weights, num_prefill, _) in zip(PROMPTS, batched):
        ((t1, e1, w1, n1, _),) = record_batch(m, [seq], pad_id=PAD_ID)
        assert tokens.tolist() == seq and num_prefill == n1 == len(seq)
        assert np.array_equal(experts, e1) and experts.shape == (
            len(seq),
            len(get_adapter(m).moe_layers(m)),
            2,
        )
        np.testing.assert_allclose(weights, w1, atol=1e-6)


def teacher_forced(m, tokens):
    ((_, experts, _, _, _),) = record_batch(m, [list(tokens)], pad_id=PAD_ID)
    return experts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_rows_align_token_for_token(arch):
    m = model(arch)
    rows = record_batch(m, PROMPTS[:3], pad_id=PAD_ID, max_new_tokens=4, eos_ids=[EOS_ID])
    for seq, (tokens, experts, _, num_prefill, _) in zip(PROMPTS, rows):
        with torch.no_grad():
            ref = m.generate(torch.tensor([seq]), max_new_tokens=4, do_sample=False, pad_token_id=PAD_ID)
        assert tokens.tolist() == ref[0].tolist()  # the generated text, token for token
        assert num_prefill == len(seq) and len(experts) == len(tokens)
        # decode step s routed generated token s-1: the same experts a teacher-forced pass picks
        assert np.array_equal(experts, teacher_forced(m, tokens))


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])
def test_generation_batched_equals_unbatched_and_sampling_aligns(arch):
    m = model(arch)
    rows = record_batch(m, PROMPTS, pad_id=PAD_ID, max_new_tokens=3, eos_ids=[EOS_ID])
    for seq, row in zip(PROMPTS, rows):
        ((tokens, experts, _, _, _),) = record_batch(m, [seq], pad_id=PAD_ID, max_new_tokens=3, eos_ids=[EOS_ID])
        assert np.array_equal(row[0], tokens) and np.array_equal(row[1], experts)
    torch.manual_seed(0)
    sampled = record_batch(
        m, PROMPTS, pad_id=PAD_ID, max_new_tokens=3, generate_kwargs={"do_sample": True, "top_k": 0}
    )
    for tokens, experts, _, _, _ in sampled:
        assert np.array_equal(experts, teacher_forced(m, tokens))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padded_generation_equals_unbatched_on_cuda(arch):
    m = tiny_moe_model(arch).to("cuda")
    rows = record_batch(m, PROMPTS, pad_id=PAD_ID, max_new_tokens=4)
    for seq, row in zip(PROMPTS, rows):
        ((tokens, experts, _, _, _),) = record_batch(m, [seq], pad_id=PAD_ID, max_new_tokens=4)
        assert np.array_equal(row[0], tokens) and np.array_equal(row[1], experts)
        assert np.array_equal(experts, teacher_forced(m, tokens))


def test_generation_stops_before_eos():
    m = model("olmoe")
    seq = PROMPTS[0]
    ((free, _, _, _, _),) = record_batch(m, [seq], pad_id=PAD_ID, max_new_tokens=5)
    gen = free[len(seq) :].tolist()
    stop = next(i for i, t in enumerate(gen) if i >= 1 and t not in gen[:i])  # first repeat-free token
    m.generation_config.eos_token_id = gen[stop]
    try:
        rows = record_batch(m, [seq, PROMPTS[1]], pad_id=PAD_ID, max_new_tokens=5, eos_ids=[gen[stop]])
        # no eos_ids given: the generation config's (a finished row's end and the pads fed after it are not kept)
        default = record_batch(m, [seq, PROMPTS[1]], pad_id=PAD_ID, max_new_tokens=5)
        listed = list(record_prompts(m, [seq], pad_id=PAD_ID, max_new_tokens=5))
    finally:
        m.generation_config.eos_token_id = EOS_ID
    tokens, experts, weights, _, _ = rows[0]
    assert tokens.tolist() == seq + gen[:stop] and len(experts) == len(weights) == len(tokens)
    assert gen[stop] not in rows[1][0][len(PROMPTS[1]) :].tolist()
    for got in (default[0][0], listed[0].token_ids):
        assert got.tolist() == tokens.tolist()


def test_a_token_the_model_has_no_embedding_for_is_refused_before_recording():
    m = model("olmoe")
    vocab = m.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=f"prompt 1: token id {vocab} is outside the model's vocabulary of {vocab}"):
        next(record_prompts(m, [PROMPTS[0], [1, vocab, 2]], pad_id=PAD_ID))
    with pytest.raises(ValueError, match="left padding"):  # before any batch runs
        next(record_prompts(m, PROMPTS, pad_id=PAD_ID, padding_side="right", max_new_tokens=2))


def test_generation_needs_left_padding():
    with pytest.raises(ValueError, match="left padding"):
        record_batch(model("olmoe"), PROMPTS, pad_id=PAD_ID, padding_side="right", max_new_tokens=2)


def test_chat_template_encoding():
    tok = tiny_tokenizer()
    (ids,) = encode_prompts(tok, ["hello world"], max_prompt_tokens=None, chat_template=True)
    assert tok.decode(ids) == "<s>user: hello world\n<s>assistant: "
    (short,) = encode_prompts(tok, ["hello world"], max_prompt_tokens=1, chat_template=False)
    assert len(short) == 1
    with pytest.raises(ValueError, match="tokenizer has none"):
        encode_prompts(tiny_tokenizer(chat_template=False), ["x"], None, chat_template=True)


def test_records_write_and_load(tmp_path):
    m = model("qwen2_moe")
    meta = trace_meta_for(m, source_model="tiny-qwen2-moe", recording={"mode": "generate"})
    with pytest.warns(UserWarning, match=rf"1 prompt\(s\) tokenize to no tokens .*\[{len(PROMPTS)}\]"):
        records = record_prompts(
            m, PROMPTS + [[]], pad_id=PAD_ID, batch_size=3, max_new_tokens=2, eos_ids=[EOS_ID]
        )
        ts = write_traces(tmp_path / "traces", meta, records)  # (a generator: it warns once iterated)
    assert ts.meta.num_sequences == len(PROMPTS)  # the empty prompt is skipped
    with pytest.warns(UserWarning, match=r"tokenize to no tokens and are not recorded \(prompts \['line 9'\]\)"):
        record_prompts(m, [[]], pad_id=PAD_ID, names=["line 9"])  # named as the caller knows it, not by index
    loaded = load_traces(tmp_path / "traces")
    by_id = {r.prompt_id: r for r in loaded}
    assert sorted(by_id) == [0, 1, 2, 3]
    assert by_id[0].num_prefill == len(PROMPTS[0]) and by_id[0].experts.shape[1:] == (2, 2)
    assert by_id[0].weights is not None and loaded.meta.has_weights


def test_recording_overhead_reports_both_timings():
    r = recording_overhead(model("olmoe"), batch_size=2, seq_len=8, max_new_tokens=2, repeats=1)
    assert (r["prompt_tokens"], r["new_tokens"]) == (16, 4) and r["plain_s"] > 0 and r["recorded_s"] > 0


def test_recording_overhead_cli_refuses_bad_flags_before_the_model_loads(tmp_path, capsys):
    """Exit 2 naming the flag: a device this machine lacks, a count below its floor, a local model path
    that is not there (transformers would call it a bad repo id)."""
    from integrate.record import main

    cases = [(["data/demo/model", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
             (["data/demo/model", "--new-tokens", "-1"], "--new-tokens: must be >= 0, got -1"),
             (["data/demo/model", "--device", "gpu"], "--device=gpu: not a device"),
             ([str(tmp_path / "missing"), "--device", "cpu"], f"model={tmp_path / 'missing'}: no such directory")]
    if not torch.cuda.is_available():
        cases.append((["data/demo/model", "--device", "cuda"], "--device=cuda requested but torch sees no CUDA device"))
    for argv, said in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err, argv


def gate_on_hidden_states(m, tokens, B):
    """Independent check: each MoE layer's gate picks from output_hidden_states (the state entering its
    decoder layer), through the adapter's norm and router, as the runtime's gate driver computes them."""
    ad = get_adapter(m)
    with torch.no_grad():
        hs = m(torch.tensor([list(tokens)]), output_hidden_states=True).hidden_states
        picks = []
        for layer in ad.moe_layers(m):
            x = ad.gate_input(m, layer, hs[layer][0])
            picks.append(gate_picks(*ad.router_topk(m, layer, x), B)[0])
    return torch.stack(picks, 1).numpy()  # (T, L, B)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gate_ahead_picks_are_the_gate_on_the_entering_hidden_state(arch, side):
    m = model(arch)
    B = 3
    rows = record_batch(m, PROMPTS, pad_id=PAD_ID, padding_side=side, gate_ahead=B)  # padding rows dropped
    plain = record_batch(m, PROMPTS, pad_id=PAD_ID, padding_side=side)
    for seq, (_, experts, weights, _, gate), ref in zip(PROMPTS, rows, plain):
        assert gate.shape == (len(seq), experts.shape[1], B) and gate.dtype == np.int16
        assert np.array_equal(gate, gate_on_hidden_states(m, seq, B))
        assert np.array_equal(experts, ref[1]) and np.array_equal(weights, ref[2])  # recording the gate changes nothing
        assert ref[4] is None


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])
def test_gate_ahead_of_generated_tokens_is_the_teacher_forced_one(arch):
    m = model(arch)
    rows = record_batch(m, PROMPTS[:3], pad_id=PAD_ID, max_new_tokens=3, gate_ahead=2)
    for seq, (tokens, _, _, _, gate) in zip(PROMPTS, rows):
        assert len(tokens) > len(seq) and len(gate) == len(tokens)
        assert np.array_equal(gate, gate_on_hidden_states(m, tokens, 2))


def test_collected_traces_keep_the_gate_ahead_picks(tmp_path):
    m = model("qwen2_moe")
    meta = trace_meta_for(m, source_model="tiny", gate_ahead=4)
    recs = list(record_prompts(m, PROMPTS, pad_id=PAD_ID, batch_size=2, gate_ahead=4))
    ts = write_traces(tmp_path / "t", meta, recs)
    assert ts.meta.gate_ahead == 4
    for rec in ts:
        assert np.array_equal(rec.gate_ahead, gate_on_hidden_states(m, rec.token_ids, 4))


def test_cpu_decode_names_a_missing_local_model(tmp_path, capsys):
    from benchmarks.cpu_decode import main

    with pytest.raises(SystemExit) as e:  # (it was transformers' "Repo id must be in the form …")
        main(["--model", str(tmp_path / "nomodel")])
    assert e.value.code == 2 and f"--model={tmp_path / 'nomodel'}: no such directory" in capsys.readouterr().err


def test_record_prompts_refuses_gate_picks_outside_k_to_e_at_the_call():
    """The gate would clamp picks beyond E and keep fewer than asked below k, so a trace's gate_ahead would
    not be what its meta says: refused at the call (collect checks the same rule before the weights load)."""
    m = model("olmoe")
    spec = get_adapter(m).spec(m)
    for picks in (spec.top_k - 1, spec.num_experts + 1):
        with pytest.raises(ValueError, match=rf"gate_ahead={picks}: .* \[{spec.top_k}, {spec.num_experts}\]"):
            record_prompts(m, [[1, 2, 3]], pad_id=PAD_ID, gate_ahead=picks)
