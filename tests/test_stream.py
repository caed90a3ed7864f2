"""PredictionStream: token by token, layer by layer, its picks are the top-k of the whole-sequence forward."""

import pytest
import torch
from synthetic import tiny_predictor

L, E, K = 4, 10, 2
T = 9

MODELS = [
    ("token_ahead", 1, {}),
    ("layer_ahead", 1, {}),
    ("layer_ahead", 2, {"memory_heads": 1, "memory_head_dim": 4, "memory_size": 4}),  # ring buffer wraps
    ("layer_ahead", 3, {"bank_size": 3, "bank_recent": 4}),  # routing bank with the prompt's own rows
    # no depth attention: each layer from running sums (predictor/layer_steps.py)
    ("layer_ahead", 1, {"depth_blocks": 0, "depth_last": True, "bank_size": 3, "bank_recent": 4}),
]


def sequence(seed=0, vocab=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (T,), generator=g)
    ids[5] = ids[2]  # a repeated token (the bank's recent rows and the memory read it)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T * L)]).view(T, L, K)
    return ids, experts


def run(stream, ids, experts, start=0):
    """Feed tokens start.. through the stream as a server would: (T', L) dicts of picks and logits."""
    picks, logits = [], []
    for t in range(start, len(ids)):
        got = stream.token(int(ids[t]))
        for layer in range(L):
            assert layer in got or stream.lookahead is not None  # token_ahead: every layer at once
            got.update(stream.routed(layer, experts[t, layer].tolist()))
        assert sorted(got) == list(range(L))  # each layer predicted exactly once per token
        picks.append(got)
        logits.append(dict(stream.logits))
    return picks, logits


@pytest.mark.parametrize("mode,h,kw", MODELS)
@pytest.mark.parametrize("budget", [K, 5])
def test_stream_picks_equal_topk_of_forward(mode, h, kw, budget):
    model = tiny_predictor(num_layers=L, num_experts=E, top_k=K, mode=mode, lookahead=h, **kw)
    ids, experts = sequence()
    with torch.no_grad():
        full = model(ids[None], experts[None])[0]  # (T, L, E)
    stream = model.stream(budget=budget)
    assert (stream.layer_steps is not None) == (kw.get("depth_blocks") == 0)
    picks, logits = run(stream, ids, experts)
    for t in range(T):
        for layer in range(L):
            torch.testing.assert_close(logits[t][layer], full[t, layer], atol=1e-5, rtol=1e-4)
            want = full[t, layer].topk(budget).indices
            assert picks[t][layer].tolist() == want.tolist(), (t, layer)


@pytest.mark.parametrize("mode,h,kw", MODELS[1:3])
def test_layer_ahead_predicts_from_the_routing_so_far(mode, h, kw):
    """routed(l) returns layer l + h only, and changing layer l's routing changes that prediction."""
    model = tiny_predictor(num_layers=L, num_experts=E, top_k=K, mode=mode, lookahead=h, **kw)
    ids, experts = sequence(1)
    a, b = model.stream(E), model.stream(E)
    assert sorted(a.token(int(ids[0]))) == list(range(h)) and sorted(b.token(int(ids[0]))) == list(range(h))
    out_a, out_b = a.routed(0, experts[0, 0]), b.routed(0, (experts[0, 0] + 1) % E)
    assert list(out_a) == [h] and list(out_b) == [h]
    assert not torch.allclose(a.logits[h], b.logits[h])
    for layer in range(1, L):  # the last h layers predict nothing further
        assert list(a.routed(layer, experts[0, layer])) == ([layer + h] if layer + h < L else [])


def test_prefill_then_decode_equals_forward():
    model = tiny_predictor(num_layers=L, num_experts=E, top_k=K, mode="layer_ahead", lookahead=1,
                           memory_heads=1, memory_head_dim=4, memory_size=4)
    ids, experts = sequence(2)
    with torch.no_grad():
        full = model(ids[None], experts[None])[0]
    stream = model.stream(K)
    stream.prefill(ids[:4], experts[:4])  # the prompt's routing, known after the prefill forward pass
    picks, logits = run(stream, ids, experts, start=4)
    for i, t in enumerate(range(4, T)):
        for layer in range(L):
            torch.testing.assert_close(logits[i][layer], full[t, layer], atol=1e-5, rtol=1e-4)
            assert picks[i][layer].tolist() == full[t, layer].topk(K).indices.tolist()


def test_stream_errors_name_the_problem():
    model = tiny_predictor(num_layers=L, num_experts=E, top_k=K, mode="layer_ahead", lookahead=1)
    with pytest.raises(ValueError, match="budget=0"):
        model.stream(0)
    stream = model.stream()
    with pytest.raises(ValueError, match="before token"):
        stream.routed(0, [1, 2])
    stream.token(3)
    with pytest.raises(ValueError, match="expected layer 0"):
        stream.routed(1, [1, 2])
    with pytest.raises(ValueError, match="at most k=2 distinct expert ids in \\[0, 10\\)"):
        stream.routed(0, [1, 12])
    with pytest.raises(ValueError, match="distinct expert ids.*got \\[3, 3\\]"):
        stream.routed(0, [3, 3])  # a router names an expert once
    stream.routed(0, [1])  # fewer than k ids: padded
    with pytest.raises(ValueError, match="layers 1..3 were not routed yet"):
        stream.token(4)


def test_readme_quickstart_runs(tmp_path):
    """The README's PredictionStream quickstart, run as written (the server's functions stubbed)."""
    import re
    from pathlib import Path

    from predictor.export import export_predictor

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Predictions in your own server**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = tiny_predictor(num_layers=L, num_experts=E, top_k=K, mode="layer_ahead", lookahead=2)
    path = export_predictor(model, tmp_path / "p.safetensors", {"source_model": "tiny"})
    code = re.sub(r'from_pretrained\("[^"]+"\)', f"from_pretrained({str(path)!r})", code)
    code = code.replace("budget=6", "budget=3")
    ids, experts = sequence(4)
    fetched, t = [], {"t": -1}

    def run_moe_layer(layer):
        t["t"] += layer == 0
        return experts[t["t"], layer].tolist()

    scope = {"token_ids": ids.tolist(), "prefetch": lambda layer, e: fetched.append((layer, len(e))),
             "run_moe_layer": run_moe_layer}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert fetched == [(layer, 3) for _ in range(T) for layer in range(L)]  # every layer of every token, once


def test_gate_inputs_stream_predicts_each_layer_from_its_gate_picks():
    """A predictor with gate_inputs: gate(l, picks) after layer l - 1's routing returns layer l, the
    top-k of the whole-sequence forward, after a prefill with the prompt's picks too; out of order, refused."""
    model = tiny_predictor(num_layers=L, num_experts=E, top_k=K, mode="layer_ahead", lookahead=1, gate_inputs=3)
    ids, experts = sequence(3)
    g = torch.Generator().manual_seed(5)
    gate = torch.stack([torch.randperm(E, generator=g)[:4] for _ in range(T * L)]).view(T, L, 4)  # 4 >= 3 kept
    with torch.no_grad():
        full = model(ids[None], experts[None], gate=gate[None])[0]
    stream = model.stream(K)
    stream.prefill(ids[:3], experts[:3], gate[:3])
    for t in range(3, T):
        assert stream.token(int(ids[t])) == {}
        for layer in range(L):
            got = stream.gate(layer, gate[t, layer].tolist())
            assert list(got) == [layer] and got[layer].tolist() == full[t, layer].topk(K).indices.tolist()
            torch.testing.assert_close(stream.logits[layer], full[t, layer], atol=1e-5, rtol=1e-4)
            assert stream.routed(layer, experts[t, layer].tolist()) == {}
    stream.token(0)
    with pytest.raises(ValueError, match="before gate"):
        stream.routed(0, [1, 2])
    with pytest.raises(ValueError, match="expected layer 0"):
        stream.gate(1, [1, 2, 3])
    with pytest.raises(ValueError, match="at least 3 expert ids"):
        stream.gate(0, [1, 2])
    with pytest.raises(ValueError, match="gate_inputs = 0"):
        tiny_predictor(num_layers=L, num_experts=E, top_k=K, mode="layer_ahead").stream(K).gate(0, [1, 2, 3])
