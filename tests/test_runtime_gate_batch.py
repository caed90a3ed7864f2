"""The cross-layer gate driver, prefetch for batches of several sequences, and sampled decoding.

Everything on CPU with the tiny models: offloaded generation must give the unpatched model's tokens
(greedy, batch 1 and batch 4 with left padding; and sampled with a fixed seed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import tiny_predictor
from tiny_models import ARCHITECTURES, PAD_ID, tiny_moe_model

from integrate.adapters import get_adapter
from integrate.runtime import install
from integrate.runtime.cache import ExpertCache
from integrate.runtime.gate import gate_picks
from integrate.runtime.prefetcher import Prefetcher
from integrate.runtime.store import ExpertStore

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 7, 11, 64]])
NEW_TOKENS = 6
# four prompts of different lengths, left-padded as a tokenizer with padding_side="left" does
ROWS = [[5, 17, 99, 3, 42, 7, 11, 64], [8, 9, 10], [200, 13, 77, 31, 6], [44, 45, 46, 47, 48, 49, 50]]


pytestmark = pytest.mark.usefixtures("one_thread")


def left_padded(rows=ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def generate(model, ids, mask=None, seed=None, **sampling):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=PAD_ID,
            do_sample=bool(sampling),
            **sampling,
        )


def num_moe_layers(model) -> int:
    return len(get_adapter(model).moe_layers(model))


def offloaded(model, ids, mask=None, seed=None, sampling=None, **kw):
    rt = install(model, device="cpu", **kw)
    try:
        out = generate(model, ids, mask, seed, **(sampling or {}))
        return out, rt.counters.copy()
    finally:
        rt.uninstall()


def check_counters(c, batch: int, prompt_tokens: int = PROMPT.numel()):
    assert c.decode_tokens == batch * (NEW_TOKENS - 1)
    assert c.prefill_tokens == prompt_tokens  # the prompts' own tokens: left padding is not counted
    assert c.prefetches_issued > 0 and c.prefetches_issued == c.prefetches_used + c.prefetches_wasted
    assert 0 < c.routed_scored and 0 <= c.predicted_routed <= c.routed_scored


# ---------------------------------------------------------------- the adapter's gate methods


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_router_topk_is_the_routers_own_choice_on_its_true_input(arch):
    """Fed the router's true input, the adapter gives the router's own top-k (group limits and score
    correction included); gate_input is that input's norm; layer_input_hook sees the decoder layer's input."""
    model = tiny_moe_model(arch)
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    decoder = model.model.layers
    seen, handles = {}, []
    for layer in layers:
        router = adapter.router_module(model, layer)
        norm = decoder[layer].post_attention_layernorm
        handles += [
            router.register_forward_hook(
                lambda m, a, out, layer=layer: seen.update({("in", layer): a[0], ("ids", layer): out[2]})
            ),
            norm.register_forward_pre_hook(
                lambda m, a, layer=layer: seen.update({("pre_norm", layer): a[0]})
            ),
            adapter.layer_input_hook(
                model, layer, lambda h, layer=layer: seen.update({("entering", layer): h})
            ),
        ]
    with torch.no_grad():
        out = model(PROMPT, output_hidden_states=True)
    for h in handles:
        h.remove()
    k = adapter.spec(model).top_k
    with torch.no_grad():
        for layer in layers:
            true_input = seen[("in", layer)].reshape(-1, model.config.hidden_size)
            ids, affinity = adapter.router_topk(model, layer, true_input)
            expected = seen[("ids", layer)].reshape(len(true_input), -1)
            assert ids.shape == (PROMPT.numel(), k) and affinity.shape[-1] == adapter.spec(model).num_experts
            assert torch.equal(ids.sort(-1).values, expected.sort(-1).values)
            normed = adapter.gate_input(model, layer, seen[("pre_norm", layer)])
            assert torch.equal(normed.reshape(true_input.shape), true_input)
            assert torch.equal(seen[("entering", layer)], out.hidden_states[layer])
            # more than k: the router's own picks first, then the rest by affinity, no repeats
            E = affinity.shape[-1]
            all_ids, scores = gate_picks(ids, affinity, E)
            assert all(len(set(row.tolist())) == E for row in all_ids)
            assert torch.equal(all_ids[:, :k].sort(-1).values, expected.sort(-1).values)
            assert bool((scores[:, k:-1] >= scores[:, k + 1 :]).all())
            assert torch.equal(gate_picks(ids, affinity, 1)[0], all_ids[:, :1])


def test_gate_input_refuses_a_dense_layer():
    model = tiny_moe_model("deepseek_v2")  # decoder layer 0 is dense
    with pytest.raises(ValueError, match="dense"):
        get_adapter(model).gate_input(model, 0, torch.zeros(1, 32))


# ---------------------------------------------------------------- the batch union


def test_prefetch_rows_takes_the_union_capped_best_score_first():
    store = ExpertStore.from_experts(lambda layer, e: {"w": torch.full((2,), float(e))}, 3, 5, pin=False)
    cache = ExpertCache(store, 6, "cpu", policy="predictor", per_layer=True)  # 2 slots per layer
    driver = Prefetcher(cache, 3, 2)
    driver.begin_step(torch.zeros(3, 1, dtype=torch.long))
    assert driver.layer_capacity == 2
    driver.prefetch_rows(1, [[0, 1], [2, 1], [3, 4]], [[0.9, 0.1], [0.5, 0.4], [0.95, 0.2]])
    # best score per expert: 3 .95, 0 .9, 2 .5, 1 .4, 4 .2 -> the two best fit the layer's slots
    assert {key for key in cache.pool.slot_of} == {(1, 3), (1, 0)}
    assert cache.counters.prefetches_issued == 2
    driver.routed(1, torch.tensor([[0, 1], [2, 3], [3, 4]]))  # rows' own picks: 2 + 1 + 2 of 6 routed
    c = cache.counters
    assert (c.predicted_routed, c.routed_scored) == (5, 6) and c.prediction_recall == pytest.approx(5 / 6)


# ---------------------------------------------------------------- exactness: gate, batch 4, sampling


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gate_prefetch_keeps_tokens(arch):
    model = tiny_moe_model(arch)
    ref = generate(model, PROMPT)
    out, c = offloaded(model, PROMPT, capacity=0.5, policy="predictor", prefetch="gate")
    assert torch.equal(out, ref)
    check_counters(c, 1)
    assert c.predictor_steps == NEW_TOKENS - 1
    # every MoE layer of every decode token is predicted (the first one from the embeddings' side)
    assert c.routed_scored == (NEW_TOKENS - 1) * num_moe_layers(model) * get_adapter(model).spec(model).top_k
    assert not model.model.layers[0]._forward_pre_hooks  # uninstall removed the gate's hooks


def _prefetch_kw(model, prefetch: str) -> dict:
    if prefetch.startswith("predictor"):
        mode = prefetch.split("-")[1]
        extra = {"memory_heads": 1, "memory_head_dim": 4, "memory_size": 3} if mode == "layer_ahead" else {}
        if mode == "gate_inputs":  # a layer_ahead predictor fed the cross-layer gate's picks (gate_inputs.py)
            mode, extra = "layer_ahead", {"gate_inputs": 3}
        predictor = tiny_predictor(
            vocab_size=model.config.vocab_size, num_layers=num_moe_layers(model), mode=mode, **extra
        )
        return dict(predictor=predictor, prefetch="predictor")
    return dict(prefetch=prefetch)


@pytest.mark.parametrize("prefetch", ["cooc", "predictor-token_ahead", "predictor-layer_ahead", "gate",
                                      "predictor-gate_inputs"])  # fmt: skip
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batch_of_four_keeps_tokens_and_prefetches_for_every_row(arch, prefetch):
    model = tiny_moe_model(arch)
    ids, mask = left_padded()
    ref = generate(model, ids, mask)
    kw = _prefetch_kw(model, prefetch)
    out, c = offloaded(model, ids, mask, capacity=0.5, policy="predictor", **kw)
    assert torch.equal(out, ref), f"{arch} {prefetch}: tokens differ at batch 4"
    check_counters(c, len(ROWS), sum(map(len, ROWS)))
    k = get_adapter(model).spec(model).top_k
    if prefetch != "cooc":  # cooc predicts layers 1.. only; the others every layer of every row
        assert c.routed_scored == len(ROWS) * (NEW_TOKENS - 1) * num_moe_layers(model) * k


def test_gate_inputs_driver_predicts_each_layer_from_its_picks(monkeypatch):
    """The driver of a predictor with gate_inputs calls it once per MoE layer of each decode token, with
    the routing of the layers below and the gate's picks up to that layer, the picks being the gate
    driver's own (gate_picks of the router on the entering hidden state); uninstall removes its hooks."""
    from predictor.model import ExpertPredictor

    model = tiny_moe_model("qwen2_moe")
    kw = _prefetch_kw(model, "predictor-gate_inputs")
    L = num_moe_layers(model)
    calls, real = [], ExpertPredictor.logits

    def spy(self, ctx, routed, layers=None, state=None, gate=None):
        calls.append((layers.start, routed.shape[2], None if gate is None else gate.clone()))
        return real(self, ctx, routed, layers, state, gate)

    monkeypatch.setattr(ExpertPredictor, "logits", spy)
    ref = generate(model, PROMPT)
    out, c = offloaded(model, PROMPT, capacity=0.5, policy="predictor", **kw)
    assert torch.equal(out, ref) and c.predictor_steps == NEW_TOKENS - 1
    assert [(layer, n) for layer, n, _ in calls] == [(i, i) for i in range(L)] * (NEW_TOKENS - 1)
    assert all(g.shape == (1, 1, layer + 1, 3) and bool((g >= 0).all()) for layer, _, g in calls)
    # the picks served are the ones collect.py records for the same tokens (what the predictor trained on)
    from integrate.record import record_batch

    monkeypatch.setattr(ExpertPredictor, "logits", real)
    ((_, _, _, _, recorded),) = record_batch(model, [out[0].tolist()], pad_id=PAD_ID, gate_ahead=3)
    served = torch.stack([g[0, 0, layer] for layer, _, g in calls]).view(NEW_TOKENS - 1, L, 3)
    assert torch.equal(served, torch.from_numpy(recorded[PROMPT.shape[1] : -1]).long())
    assert c.routed_scored == (NEW_TOKENS - 1) * L * get_adapter(model).spec(model).top_k
    assert not any(layer._forward_pre_hooks for layer in model.model.layers)
    with pytest.raises(ValueError, match="needs the transformers `model`"):
        from integrate.runtime.drivers import make_prefetcher

        make_prefetcher("predictor", None, L, 8, 2, predictor=kw["predictor"], predictor_device="cpu")


@pytest.mark.parametrize("prefetch", ["gate", "predictor-gate_inputs"])
def test_gate_drivers_leave_forwards_the_runtime_does_not_drive_alone(prefetch):
    """After generate(), a forward the runtime does not drive (no begin_step: inputs_embeds, other shapes)
    runs with the gate drivers' hooks still installed: they predict nothing, and it computes as unpatched."""
    model = tiny_moe_model("qwen2_moe")
    emb = model.get_input_embeddings()(torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]]))
    with torch.no_grad():
        ref = model(inputs_embeds=emb).logits
    rt = install(model, device="cpu", capacity=0.5, policy="predictor", **_prefetch_kw(model, prefetch))
    try:
        generate(model, PROMPT)
        before = rt.counters.copy()
        with torch.no_grad():
            out = model(inputs_embeds=emb).logits
        after = rt.counters.copy()
    finally:
        rt.uninstall()
    torch.testing.assert_close(out, ref)
    assert (after.predictor_steps, after.prefetches_issued) == (before.predictor_steps, before.prefetches_issued)


def test_batch_predictor_state_is_the_batch(monkeypatch):
    """The predictor runs one state of batch 4: its prefill sees padding as -1, its decode steps (4,) ids."""
    from integrate.runtime.prefetch import PredictorDriver

    model = tiny_moe_model("olmoe")
    ids, mask = left_padded()
    calls = []
    real_begin = PredictorDriver.begin_step

    def spy(self, token_ids, padding=None):
        real_begin(self, token_ids, padding)
        calls.append((tuple(token_ids.shape), self.state.batch_size, self._tokens.clone()))

    monkeypatch.setattr(PredictorDriver, "begin_step", spy)
    offloaded(model, ids, mask, capacity=0.5, **_prefetch_kw(model, "predictor-token_ahead"))
    (prefill, batch, tokens), *decode = calls
    assert prefill == tuple(ids.shape) and batch == len(ROWS)
    assert torch.equal(tokens < 0, mask == 0)  # exactly the padding positions enter as "no token"
    assert [shape for shape, _, _ in decode] == [(len(ROWS), 1)] * (NEW_TOKENS - 1)


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_sampling_with_a_seed_gives_the_same_tokens_offloaded(arch):
    model = tiny_moe_model(arch)
    ids, mask = left_padded()
    sampling = dict(temperature=1.5, top_p=0.95, top_k=50)
    ref = generate(model, ids, mask, seed=3, **sampling)
    assert not torch.equal(ref, generate(model, ids, mask, seed=4, **sampling))  # sampling is on
    out, _ = offloaded(model, ids, mask, seed=3, sampling=sampling, capacity=0.5, prefetch="gate")
    assert torch.equal(out, ref)


def test_cli_compares_prefetch_methods_batched_and_sampled(tmp_path, capsys):
    import json

    from tiny_models import tiny_tokenizer

    from integrate.__main__ import main

    tiny_moe_model("olmoe").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    common = [
        "decode",
        "--model",
        str(tmp_path / "model"),
        "--capacity",
        "4",
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
        "--prompts",
        "hello world",
        "the fox",
        "experts route",
        "--check",
    ]
    rc = main(
        common + ["--prefetch", "gate", "cooc", "--batch-size", "2", "--json", str(tmp_path / "c.json")]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("tokens identical to the unpatched model") == 2 and "prediction recall" in out
    table = out[out.index("prefetch    recall") :].splitlines()  # the comparison, one row per method
    assert [row.split()[0] for row in table[1:3]] == ["gate", "cooc"]
    saved = json.loads((tmp_path / "c.json").read_text())
    assert set(saved) == {"gate", "cooc"} and 0 < saved["gate"]["prediction_recall"] <= 1
    rc = main(
        common
        + ["--prefetch", "gate", "--do-sample", "--temperature", "1.3", "--top-p", "0.9", "--seed", "7"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "sampling (seed 7, temperature 1.3, top_p 0.9)" in out, out
    assert "tokens identical to the unpatched model" in out
    with pytest.raises(SystemExit):
        main(common + ["--temperature", "0.5"])  # sampling settings without --do-sample


def test_gate_needs_a_model():
    from integrate.runtime.drivers import make_prefetcher

    store = ExpertStore.from_experts(lambda layer, e: {"w": torch.zeros(2)}, 2, 4, pin=False)
    with pytest.raises(ValueError, match="hidden states"):
        make_prefetcher("gate", ExpertCache(store, 2, "cpu"), 2, 4, 2)
    with pytest.warns(UserWarning, match=r"threshold \(--threshold\) = 0.5 is a predictor's: prefetch 'cooc'"):
        make_prefetcher("cooc", ExpertCache(store, 2, "cpu"), 2, 4, 2, threshold=0.5)  # was ignored silently


def test_replay_benchmark_skips_the_gate_and_says_why():
    from benchmarks.bench_replay import bench
    from benchmarks.replay_data import synthetic_data

    logged = []
    rows = bench(
        synthetic_data(),
        device="cpu",
        capacities=(0.25,),
        methods=("lru", "gate"),
        max_tokens=2,
        warmup=1,
        dense_mb=0.01,
        dtype=torch.float32,
        log=logged.append,
    )
    assert [r["method"] for r in rows] == ["lru"]
    assert any("gate: skipped" in line and "hidden states" in line for line in logged)
    assert np.isfinite(rows[0]["tokens_per_s"])


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", ["gate", "predictor-layer_ahead", "predictor-token_ahead", "predictor-gate_inputs"])
def test_cuda_batch_of_four_keeps_tokens(prefetch):
    """On CUDA: the batched layer_ahead driver replays its per-layer graphs at batch 4; the gate's
    router calls run on the device between layers."""
    model = tiny_moe_model("olmoe").to("cuda")
    model.set_experts_implementation("eager")  # generate() on a GPU swaps grouped_mm for batched_mm
    ids, mask = (t.cuda() for t in left_padded())
    ref = generate(model, ids, mask)
    kw = _prefetch_kw(model, prefetch)
    rt = install(model, device="cuda", capacity=0.5, policy="predictor", **kw)
    try:
        out, c = generate(model, ids, mask), rt.counters.copy()
    finally:
        rt.uninstall()
    assert torch.equal(out, ref)
    check_counters(c, len(ROWS), sum(map(len, ROWS)))
