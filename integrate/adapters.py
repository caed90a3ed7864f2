"""Per-architecture knowledge of transformers' MoE blocks: the one seam into `transformers` internals.

transformers 5.23 stores each MoE layer as `layer.mlp` holding a router (`mlp.gate`, or `mlp.router`
for GPT-OSS) and a fused experts module `mlp.experts` whose weights are 3-D parameters with the
expert on dim 0. The experts module is called as `experts(hidden [N, H], top_k_index [N, k],
top_k_weights [N, k])`; that call is the seam used for recording (a forward pre-hook sees exactly
the dispatched ids, DeepSeek grouping and score-correction bias included) and for offloading
(`swap_experts` installs a module with the same signature).

`routed_forward` recomputes the experts' output one expert at a time from tensors handed out by
a `fetch(e)` callback, so an offloading runtime can stream weights in, and it does so with the
same floating-point operations in the same order as the implementation the model dispatches to
(`config._experts_implementation`: "eager" or "grouped_mm"; the latter is transformers' default),
which makes its output bitwise identical to the unpatched model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import _grouped_mm  # the dispatcher the model's grouped_mm path calls

Fetch = Callable[[int], dict[str, torch.Tensor]]


class UnsupportedModelError(ValueError):
    """The model is not a mixture-of-experts architecture this module knows."""


@dataclass(frozen=True)
class MoESpec:
    architecture: str  # config.model_type
    num_layers: int  # decoder layers, dense ones included
    moe_layers: list[int]  # decoder-layer index of every layer with routed experts
    num_experts: int  # routed experts per MoE layer (E)
    top_k: int  # routed experts per token (k)
    num_shared_experts: int  # always-on experts outside `mlp.experts` (not routed, not offloaded)
    hidden_size: int
    intermediate_size: int  # per routed expert
    expert_dtype: str  # e.g. "bfloat16"
    expert_bytes: int  # bytes of one routed expert's tensors (biases included)
    experts_implementation: str  # what `experts.forward` dispatches to


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.model if hasattr(model, "model") else model  # *ForCausalLM or the bare decoder
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__}: no decoder layer list at `.model.layers`")
    return layers


def _one_group_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ w [in, out] through the grouped-GEMM dispatcher grouped_mm_experts_forward uses.

    Same kernel, so the same rounding: on CUDA, cuBLAS picks other algorithms than the grouped
    kernel for small n (GPT-OSS-sized bf16 experts differed by 1 ulp through torch.mm).
    """
    offs = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
    return _grouped_mm(x, w.unsqueeze(0), offs=offs)


def experts_implementation(experts: nn.Module) -> str:
    # `@use_experts_implementation` dispatches on config._experts_implementation; None falls back
    # to the class's own (eager) forward
    config = getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None) or "eager"


class MoEAdapter:
    """Fused gate/up + down experts (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`), router at `mlp.gate`."""

    architecture = ""
    router_attr = "gate"
    tensor_names = ("gate_up_proj", "down_proj")
    # CPU elementwise kernels vectorise a flattened tensor and finish its tail with scalar code, so
    # a gate whose intermediates are contiguous [N, I] tensors rounds differently at different N.
    # `chunk(2)` views keep the default gate row by row; GPT-OSS's interleaved gate is not, so its
    # grouped replica gates a buffer of the same [N*k, 2I] shape as grouped_mm does.
    row_local_gate = True

    # ---- structure -------------------------------------------------------------------------
    def num_shared_experts(self, config) -> int:
        return 0

    def is_moe_layer(self, layer: nn.Module) -> bool:
        mlp = getattr(layer, "mlp", None)
        return hasattr(mlp, "experts") and hasattr(mlp, self.router_attr)

    def moe_layers(self, model: nn.Module) -> list[int]:
        return [i for i, layer in enumerate(_decoder_layers(model)) if self.is_moe_layer(layer)]

    def _moe_mlp(self, model: nn.Module, layer: int) -> nn.Module:
        layers = _decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise IndexError(f"decoder layer {layer} out of range [0, {len(layers)})")
        if not self.is_moe_layer(layers[layer]):
            raise ValueError(
                f"{self.architecture}: decoder layer {layer} has no routed experts (dense layer); "
                f"MoE layers are {self.moe_layers(model)}"
            )
        return layers[layer].mlp

    def experts_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self._moe_mlp(model, layer).experts

    def router_module(self, model: nn.Module, layer: int) -> nn.Module:
        return getattr(self._moe_mlp(model, layer), self.router_attr)

    def swap_experts(self, model: nn.Module, layer: int, module: nn.Module) -> nn.Module:
        """Install `module` as the layer's experts (same call signature); returns the old one."""
        mlp = self._moe_mlp(model, layer)
        old = mlp.experts
        mlp.experts = module
        return old

    def spec(self, model: nn.Module) -> MoESpec:
        moe_layers = self.moe_layers(model)
        if not moe_layers:
            raise UnsupportedModelError(f"{self.architecture}: the model has no layer with routed experts")
        first = moe_layers[0]
        # E and k come from the router: config key names differ between families
        router = self.router_module(model, first)
        experts = self.experts_module(model, first)
        tensors = self.expert_tensors(experts, 0)
        hidden, inter = self._expert_dims(tensors)
        return MoESpec(
            architecture=self.architecture,
            num_layers=len(_decoder_layers(model)),
            moe_layers=moe_layers,
            num_experts=int(router.num_experts),
            top_k=int(router.top_k),
            num_shared_experts=self.num_shared_experts(model.config),
            hidden_size=hidden,
            intermediate_size=inter,
            expert_dtype=str(tensors[self.tensor_names[0]].dtype).removeprefix("torch."),
            expert_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
            experts_implementation=experts_implementation(experts),
        )

    # ---- one expert's weights ----------------------------------------------------------------
    def expert_tensors(self, experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
        """Views of expert `e` into the fused parameters, keyed by the parameter names."""
        return {name: getattr(experts, name)[e] for name in self.tensor_names}

    def _expert_dims(self, t: dict[str, torch.Tensor]) -> tuple[int, int]:
        hidden, inter = t["down_proj"].shape  # [H, I]
        return int(hidden), int(inter)

    # per-expert math, written exactly as each implementation writes it
    def _eager_up(self, x, t):
        return F.linear(x, t["gate_up_proj"])

    def _eager_down(self, h, t):
        return F.linear(h, t["down_proj"])

    def _grouped_up(self, x, t):  # grouped_mm is handed the weight as (in, out)
        return _one_group_mm(x, t["gate_up_proj"].transpose(-2, -1))

    def _grouped_down(self, h, t):
        return _one_group_mm(h, t["down_proj"].transpose(-2, -1))

    # ---- the routed computation, one expert at a time ----------------------------------------
    def routed_forward(
        self,
        experts: nn.Module,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        fetch: Fetch,
    ) -> torch.Tensor:
        """`experts.forward(hidden, top_k_index, top_k_weights)` with weights from `fetch(e)`.

        fetch is called once per routed expert, in ascending id order, and its tensors are used
        before the next call (so a runtime may recycle the buffer it handed out).
        """
        impl = experts_implementation(experts)
        if impl == "eager":
            return self._eager_forward(experts, hidden, top_k_index, top_k_weights, fetch)
        if impl == "grouped_mm":
            return self._grouped_forward(experts, hidden, top_k_index, top_k_weights, fetch)
        raise NotImplementedError(
            f"{self.architecture}: routed_forward replicates experts_implementation 'eager' and "
            f"'grouped_mm', not {impl!r}; call model.set_experts_implementation('grouped_mm') first"
        )

    def _eager_forward(self, experts, hidden, top_k_index, top_k_weights, fetch):
        # mirrors *Experts.forward: per expert in ascending id, tokens ordered by (slot, token),
        # accumulated with index_add_ in expert order
        final = torch.zeros_like(hidden)
        slot_major = top_k_index.transpose(0, 1)  # [k, N], the layout of expert_mask[e]
        for e in torch.unique(top_k_index).tolist():
            top_k_pos, token_idx = torch.where(slot_major == e)
            t = fetch(e)
            h = self._eager_up(hidden[token_idx], t)
            h = experts._apply_gate(h)
            h = self._eager_down(h, t)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final

    def _grouped_forward(self, experts, hidden, top_k_index, top_k_weights, fetch):
        # mirrors integrations.moe.grouped_mm_experts_forward: (token, slot) pairs sorted by
        # expert, one matmul per expert group, outputs summed over the k slots of each token
        num_tokens, k = top_k_index.shape
        flat_weights = top_k_weights.reshape(-1)
        expert_sorted, perm = torch.sort(top_k_index.reshape(-1))
        counts = torch.bincount(expert_sorted, minlength=int(experts.num_experts)).tolist()
        weighted = scratch = None
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = perm[start : start + n]
            t = fetch(e)
            h = self._grouped_up(hidden[rows // k], t)
            if self.row_local_gate:
                h = experts._apply_gate(h)
            else:
                if scratch is None:
                    scratch = h.new_zeros((num_tokens * k, h.shape[-1]))
                scratch[start : start + n] = h
                h = experts._apply_gate(scratch)[start : start + n]
            start += n
            h = self._grouped_down(h, t)
            h = h * flat_weights[rows].unsqueeze(-1)
            if weighted is None:
                weighted = h.new_zeros((num_tokens * k, h.shape[-1]))
            weighted[rows] = h
        if weighted is None:  # no tokens
            return torch.zeros_like(hidden)
        return weighted.view(num_tokens, k, -1).sum(dim=1).to(hidden.dtype)


class OlmoeAdapter(MoEAdapter):
    architecture = "olmoe"


class MixtralAdapter(MoEAdapter):
    architecture = "mixtral"


class Qwen3MoeAdapter(MoEAdapter):
    architecture = "qwen3_moe"


class Qwen2MoeAdapter(MoEAdapter):
    architecture = "qwen2_moe"

    def num_shared_experts(self, config) -> int:
        return 1 if getattr(config, "shared_expert_intermediate_size", 0) else 0  # one gated shared MLP


class DeepseekV2Adapter(MoEAdapter):
    architecture = "deepseek_v2"  # first `first_k_dense_replace` layers are dense

    def num_shared_experts(self, config) -> int:
        return int(getattr(config, "n_shared_experts", 0) or 0)


class DeepseekV3Adapter(DeepseekV2Adapter):
    architecture = "deepseek_v3"


class GptOssAdapter(MoEAdapter):
    """Transposed experts with biases: `gate_up_proj [E, H, 2I]` (gate/up interleaved), `down_proj [E, I, H]`."""

    architecture = "gpt_oss"
    router_attr = "router"
    tensor_names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    row_local_gate = False

    def _expert_dims(self, t):
        inter, hidden = t["down_proj"].shape  # [I, H]
        return int(hidden), int(inter)

    def _eager_up(self, x, t):
        return x @ t["gate_up_proj"] + t["gate_up_proj_bias"]

    def _eager_down(self, h, t):
        return h @ t["down_proj"] + t["down_proj_bias"]

    def _grouped_up(self, x, t):
        return _one_group_mm(x, t["gate_up_proj"]).add_(t["gate_up_proj_bias"])

    def _grouped_down(self, h, t):
        return _one_group_mm(h, t["down_proj"]).add_(t["down_proj_bias"])


ADAPTERS: dict[str, type[MoEAdapter]] = {
    cls.architecture: cls
    for cls in (
        OlmoeAdapter,
        Qwen2MoeAdapter,
        Qwen3MoeAdapter,
        MixtralAdapter,
        DeepseekV2Adapter,
        DeepseekV3Adapter,
        GptOssAdapter,
    )
}


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter for `model` (a transformers MoE causal LM), chosen by `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); "
            f"supported MoE architectures: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type]()


def trace_meta_for(
    model: nn.Module,
    *,
    source_model: str,
    tokenizer: str | None = None,
    prompt_source: str = "",
    recording: dict | None = None,
    has_weights: bool = True,
):
    """A `predictor.traces.TraceMeta` describing traces recorded from `model`."""
    from predictor.traces import TraceMeta

    spec = get_adapter(model).spec(model)
    dtype_bytes = torch.empty((), dtype=getattr(torch, spec.expert_dtype)).element_size()
    return TraceMeta(
        source_model=source_model,
        architecture=spec.architecture,
        num_layers=spec.num_layers,
        moe_layers=list(spec.moe_layers),
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        num_shared_experts=spec.num_shared_experts,
        vocab_size=int(model.config.vocab_size),
        tokenizer=tokenizer,
        prompt_source=prompt_source,
        recording=dict(recording or {}),
        has_weights=has_weights,
        expert_shape={
            "hidden": spec.hidden_size,
            "intermediate": spec.intermediate_size,
            "num_matrices": 3,
            "dtype_bytes": dtype_bytes,
            "bytes": spec.expert_bytes,
        },
    )
