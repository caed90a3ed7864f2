"""Per-architecture knowledge of transformers' MoE blocks: the one seam into `transformers` internals.

transformers 5.23 stores each MoE layer as `layer.mlp` holding a router (`mlp.gate`, or `mlp.router`
for GPT-OSS) and a fused experts module `mlp.experts` whose weights are 3-D parameters with the
expert on dim 0. The experts module is called as `experts(hidden [N, H], top_k_index [N, k],
top_k_weights [N, k])`; that call is the seam used for recording (a forward pre-hook sees exactly
the dispatched ids, DeepSeek grouping and score-correction bias included) and for offloading
(`swap_experts` installs a module with the same signature).

The experts' routed computation, replicated bit for bit from weights handed out at run time
(`routed_forward`, `routed_pool_forward`), is the `RoutedCompute` mixin of integrate/routed_compute.py;
each adapter here overrides only its architecture's per-expert math.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from integrate.routed_compute import (  # noqa: F401  (experts_implementation, pool_windows: imported from here)
    WINDOWS_FROM,
    Fetch,
    RoutedCompute,
    _grouped_mm,
    _one_group_mm,
    experts_implementation,
    pool_windows,
    span_window,
)


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


class MoEAdapter(RoutedCompute):
    """Fused gate/up + down experts (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`), router at `mlp.gate`."""

    architecture = ""
    router_attr = "gate"
    tensor_names = ("gate_up_proj", "down_proj")

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

    # ---- the cross-layer gate (integrate/runtime/gate.py) --------------------------------------
    def layer_input_hook(self, model: nn.Module, layer: int, fn: Callable[[torch.Tensor], None]):
        """Call `fn(hidden [B, S, H])` with the hidden state entering decoder layer `layer` (the residual
        stream leaving layer - 1, or the embeddings) before the layer runs; returns the hook's handle."""
        pre = lambda module, args, kwargs: fn(args[0] if args else kwargs["hidden_states"])  # noqa: E731
        return _decoder_layers(model)[layer].register_forward_pre_hook(pre, with_kwargs=True)

    def gate_input(self, model: nn.Module, layer: int, residual: torch.Tensor) -> torch.Tensor:
        """The layer's own pre-MoE norm of `residual` (its router reads that norm of residual + attention)."""
        self._moe_mlp(model, layer)  # a dense layer has no router to feed
        return _decoder_layers(model)[layer].post_attention_layernorm(residual)

    def router_topk(self, model: nn.Module, layer: int, hidden: torch.Tensor):
        """For router inputs `hidden` [N, H]: the router's own top-k ids [N, k] (the router module runs: group
        limits and score correction included) and [N, E] affinities, what it ranks by before group limits."""
        router = self.router_module(model, layer)
        logits, _, ids = router(hidden)
        return ids.reshape(len(hidden), -1), self.router_affinity(router, logits.reshape(len(hidden), -1))

    def router_affinity(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

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

    def router_affinity(self, router, logits):  # sigmoid scores plus the score-correction bias it chooses by
        return logits.float().sigmoid() + router.e_score_correction_bias.float()


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

    def _pool_up(self, x, pool, offs):
        return _grouped_mm(x, pool["gate_up_proj"], offs=offs).add_(self._row_bias(pool["gate_up_proj_bias"], offs))

    def _pool_down(self, h, pool, offs):
        return _grouped_mm(h, pool["down_proj"], offs=offs).add_(self._row_bias(pool["down_proj_bias"], offs))

    @staticmethod
    def _row_bias(bias, offs):
        """(S, n) per-slot bias -> (rows, n): each row gets its slot's bias."""
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
        return bias.repeat_interleave(counts, dim=0)


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
    gate_ahead: int = 0,
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
        gate_ahead=gate_ahead,
        expert_shape={
            "hidden": spec.hidden_size,
            "intermediate": spec.intermediate_size,
            "num_matrices": 3,
            "dtype_bytes": dtype_bytes,
            "bytes": spec.expert_bytes,
        },
    )
