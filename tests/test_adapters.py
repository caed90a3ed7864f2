"""Adapters: structure, per-expert views, bitwise routed_forward, swap seam, unsupported models."""

import functools

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_moe_model

from integrate.adapters import ADAPTERS, UnsupportedModelError, get_adapter, pool_windows, trace_meta_for

MOE_LAYERS = {"qwen2_moe": [0, 2], "deepseek_v2": [1, 2], "deepseek_v3": [1, 2]}  # others: all 3
SHARED = {"qwen2_moe": 1, "deepseek_v2": 1, "deepseek_v3": 1}


@functools.cache
def model(arch: str):
    return tiny_moe_model(arch)


@functools.cache
def odd_model(arch: str, dtype: torch.dtype):
    # expert width 24: rows are not a multiple of the SIMD width, so kernels run their tail code
    return tiny_moe_model(arch, intermediate_size=24, moe_intermediate_size=24).to(dtype)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_spec(arch):
    m = model(arch)
    spec = get_adapter(m).spec(m)
    assert spec.architecture == arch
    assert spec.num_layers == 3
    assert spec.moe_layers == MOE_LAYERS.get(arch, [0, 1, 2])
    assert (spec.num_experts, spec.top_k, spec.hidden_size) == (8, 2, 32)
    assert spec.num_shared_experts == SHARED.get(arch, 0)
    assert spec.experts_implementation == "grouped_mm"  # transformers' default: what must be matched
    meta = trace_meta_for(m, source_model="tiny")
    meta.validate()
    assert meta.moe_layers == spec.moe_layers and meta.expert_shape["bytes"] == spec.expert_bytes


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_expert_tensors_are_views_of_one_expert(arch):
    m = model(arch)
    ad = get_adapter(m)
    experts = ad.experts_module(m, ad.spec(m).moe_layers[0])
    tensors = ad.expert_tensors(experts, 3)
    for name, t in tensors.items():
        fused = getattr(experts, name)
        assert torch.equal(t, fused[3]) and t.data_ptr() == fused[3].data_ptr(), name
    if arch == "gpt_oss":
        assert set(tensors) == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}


def recycling_fetch(adapter, experts, calls: list):
    """Hands out one reused buffer per tensor name, as an offloading runtime would."""
    buffers = {}

    def fetch(e):
        calls.append(e)
        for name, t in adapter.expert_tensors(experts, e).items():
            buffers.setdefault(name, torch.empty_like(t)).copy_(t)
        return buffers

    return fetch


def assert_routed_forward_bitwise(m, impl: str, dtype: torch.dtype, device: str = "cpu") -> None:
    m.set_experts_implementation(impl)
    ad = get_adapter(m)
    spec = ad.spec(m)
    g = torch.Generator().manual_seed(0)
    for layer in spec.moe_layers:
        experts = ad.experts_module(m, layer)
        for n in (1, 5, 33):
            hidden = torch.randn(n, spec.hidden_size, generator=g).to(device, dtype)
            probs = torch.randn(n, spec.num_experts, generator=g).softmax(-1)
            weights, index = (t.to(device) for t in torch.topk(probs, spec.top_k))
            weights = weights.to(dtype)
            calls = []
            with torch.no_grad():
                expected = experts(hidden, index, weights)
                got = ad.routed_forward(experts, hidden, index, weights, recycling_fetch(ad, experts, calls))
            assert calls == sorted(set(index.flatten().tolist()))
            assert torch.equal(got, expected), f"{spec.architecture} {impl} {dtype} layer {layer} n={n}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_routed_forward_is_bitwise_forward(arch, impl, dtype):
    assert_routed_forward_bitwise(odd_model(arch, dtype), impl, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_routed_pool_forward_is_bitwise_grouped_mm(arch, dtype):
    """Every routed expert at once, from a pool with more slots than experts and a shuffled expert ->
    slot map (as a runtime's slot pool holds them): bitwise grouped_mm's own forward, in one grouped
    call over the pool, in windows over the used slots (`pool_windows`), and, with slots rising with
    expert ids, without the second sort (`ordered`)."""
    from integrate.runtime.store import ExpertLayout

    m = odd_model(arch, dtype)
    m.set_experts_implementation("grouped_mm")
    ad = get_adapter(m)
    spec = ad.spec(m)
    g = torch.Generator().manual_seed(1)
    for layer in spec.moe_layers:
        experts = ad.experts_module(m, layer)
        layout = ExpertLayout(ad.expert_tensors(experts, 0))
        S = spec.num_experts + 3
        buf = torch.zeros(S, layout.nbytes, dtype=torch.uint8)
        slot_of = torch.randperm(S, generator=g)[: spec.num_experts]
        for e in range(spec.num_experts):
            layout.pack(ad.expert_tensors(experts, e), buf[slot_of[e]])
        pool = layout.pool_views(buf)
        for n in (1, 5, 33):
            hidden = torch.randn(n, spec.hidden_size, generator=g).to(dtype)
            probs = torch.randn(n, spec.num_experts, generator=g).softmax(-1)
            weights, index = torch.topk(probs, spec.top_k)
            with torch.no_grad():
                expected = experts(hidden, index, weights.to(dtype))
                got = ad.routed_pool_forward(experts, hidden, index, weights.to(dtype), slot_of, pool)
                counts = torch.bincount(index.flatten(), minlength=spec.num_experts).tolist()
                used = [(int(slot_of[e]), c) for e, c in enumerate(counts) if c]
                windowed = [ad.routed_pool_forward(experts, hidden, index, weights.to(dtype), slot_of, pool,
                                                   pool_windows(used, max_groups=g_, max_gap=gap))
                            for g_, gap in ((512, 16), (3, 1), (1, 0))]  # one call .. one per used slot
                rising = slot_of.sort().values  # slots rise with expert ids: the `ordered` path, no second sort
                for e in range(spec.num_experts):
                    layout.pack(ad.expert_tensors(experts, e), buf[rising[e]])
                ordered = ad.routed_pool_pairs(experts, hidden, index, weights.to(dtype), rising, pool, ordered=True)
                for e in range(spec.num_experts):  # back to the shuffled map for the next n
                    layout.pack(ad.expert_tensors(experts, e), buf[slot_of[e]])
            assert torch.equal(got, expected), f"{spec.architecture} {dtype} layer {layer} n={n}"
            for w in windowed:
                assert torch.equal(w, expected), f"{spec.architecture} {dtype} layer {layer} n={n} (windows)"
            assert torch.equal(ordered.sum(1).to(dtype), expected), f"{spec.architecture} {dtype} (ordered)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_routed_forward_is_bitwise_forward_on_cuda(arch, dtype):
    m = tiny_moe_model(arch, intermediate_size=32, moe_intermediate_size=32).to("cuda", dtype)
    for impl in ("grouped_mm", "eager"):
        assert_routed_forward_bitwise(m, impl, dtype, "cuda")


class StreamingExperts(torch.nn.Module):
    """What a runtime installs: same call signature, weights fetched one expert at a time."""

    def __init__(self, adapter, fused):
        super().__init__()
        self.adapter, self.fused = adapter, fused

    def forward(self, hidden, top_k_index, top_k_weights):
        fetch = lambda e: self.adapter.expert_tensors(self.fused, e)
        return self.adapter.routed_forward(self.fused, hidden, top_k_index, top_k_weights, fetch)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_swap_and_unswap(arch):
    m = model(arch)
    ad = get_adapter(m)
    ids = torch.randint(3, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(ids).logits
        originals = {i: ad.experts_module(m, i) for i in ad.spec(m).moe_layers}
        for layer, fused in originals.items():
            assert ad.swap_experts(m, layer, StreamingExperts(ad, fused)) is fused
        swapped = m(ids).logits
        for layer, fused in originals.items():
            assert isinstance(ad.swap_experts(m, layer, fused), StreamingExperts)
        after = m(ids).logits
    assert torch.equal(swapped, before) and torch.equal(after, before)
    assert all(ad.experts_module(m, i) is fused for i, fused in originals.items())


def test_dense_layer_is_named():
    m = model("deepseek_v3")
    with pytest.raises(ValueError, match=r"decoder layer 0 has no routed experts.*MoE layers are \[1, 2\]"):
        get_adapter(m).experts_module(m, 0)


def test_unsupported_model_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with pytest.raises(UnsupportedModelError, match=r"model_type='llama'.*supported.*olmoe"):
        get_adapter(LlamaForCausalLM(cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_routed_forward_is_bitwise_at_full_expert_size_on_cuda(arch):
    # tiny shapes hide kernel choices: at GPT-OSS size, torch.mm and grouped_mm round differently
    from transformers import AutoConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    shapes = {"olmoe": (OlmoeExperts, 2048, 1408, 6), "gpt_oss": (GptOssExperts, 2880, 2880, 4)}
    cls, hidden, inter, k = shapes[arch]
    cfg = AutoConfig.for_model(
        arch,
        hidden_size=hidden,
        intermediate_size=inter,
        num_experts=8,
        num_local_experts=8,
        num_experts_per_tok=k,
    )
    ad = ADAPTERS[arch]()
    g = torch.Generator(device="cuda").manual_seed(0)
    for impl in ("grouped_mm", "eager"):
        cfg._experts_implementation = impl
        with torch.device("cuda"):
            experts = cls(cfg).to(torch.bfloat16)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.02, generator=g)
        for n in (1, 8, 300):
            hidden_states = torch.randn(n, hidden, device="cuda", generator=g).bfloat16()
            weights, index = torch.topk(torch.randn(n, 8, device="cuda", generator=g).softmax(-1), k)
            weights = weights.bfloat16()
            with torch.no_grad():
                expected = experts(hidden_states, index, weights)
                fetch = recycling_fetch(ad, experts, [])
                got = ad.routed_forward(experts, hidden_states, index, weights, fetch)
            assert torch.equal(got, expected), f"{arch} {impl} n={n}"


def test_pool_windows_split_at_gaps_and_at_the_group_limit():
    # slots given in any order; rows counted in slot order
    assert pool_windows([(7, 1), (2, 2), (3, 1)], max_groups=512, max_gap=16) == [(2, 8, 0, 4)]
    assert pool_windows([(7, 1), (2, 2), (3, 1)], max_groups=512, max_gap=2) == [(2, 4, 0, 3), (7, 8, 3, 4)]
    # a window never spans max_groups slots or more (torch's CUDA grouped GEMM refuses 1024 groups)
    assert pool_windows([(0, 1), (600, 1), (1000, 2), (1200, 1)], max_groups=512, max_gap=1000) == [
        (0, 1, 0, 1), (600, 1001, 1, 4), (1200, 1201, 4, 5)]
    assert pool_windows([]) == []


def test_a_small_pool_takes_one_call_over_the_used_span():
    from integrate.grouping import span_window

    assert span_window([9, 3, 5], rows=4, num_slots=32) == [(3, 10, 0, 4)]  # 7 groups, not 32
    assert span_window([0, 31], rows=2, num_slots=32) is None  # the span is the pool: no window
