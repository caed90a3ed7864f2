"""The expert-activation predictor: a causal transformer over tokens (the trunk), a head chosen by
mode, and the configured logit contributors (plain torch; no Hydra, no Lightning: the runtime loads it).

At token position t (B = batch, T = tokens, L = MoE layers, E = experts, k = top_k, D = d_model):

    x_t = embed(token_t) + sum_{l, j} embed_prev[l, experts[t-1, l, j]]      (a learned "start" vector at t = 0)
    c_t = transformer(x_{<=t})                                               (RoPE, pre-norm, causal)
    logits[t, l] = head(c_t, experts[t, <= l-h]) + sum over contributors      (predictor/heads.py,
                                                                               predictor/contributors.py)

Causality contract: `logits[:, t, l]` depends only on `token_ids[:, :t+1]`, `experts[:, :t]` and, in
layer_ahead mode, `experts[:, t, :l-h+1]`. Expert id -1 is padding (zero embedding); token id -1 is
padding (zero embedding, never attended to by real tokens; with a state, padding must enter in a call of
several tokens, as a batch's left-padded prompt does: `_served_mask`).

One forward with an optional state, as an LLM with a KV cache: `forward(ids, experts)` scores whole
sequences (training, evaluation); `forward(ids, experts, state)` continues the sequence held in
`state` (serving). A runtime that learns token t's routing layer by layer splits the same call in
two: `step` (the trunk, once per token) and `logits` (per layer, from the routing known so far).
"""

from __future__ import annotations

import torch
from torch import nn

from .bank import RoutingBank
from .blocks import Block
from .config import MODES, PredictorConfig, PredictorConfigError  # noqa: F401  (imported from here)
from .contributors import GatePicks, SkipTables
from .embeddings import ExpertSetEmbedding
from .heads import HEADS
from .hub import PredictorHubMixin
from .memory import RoutingMemory
from .state import Context, PredictorState, Routed


class ExpertPredictor(nn.Module, PredictorHubMixin, library_name="moe-prefetch", tags=["mixture-of-experts"]):
    """The predictor (module docstring). `save_pretrained` / `push_to_hub` / `from_pretrained` come from
    PredictorHubMixin (predictor/hub.py, huggingface_hub's PyTorchModelHubMixin) in the export format."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = c = config.validate()
        L, E, D = c.num_layers, c.num_experts, c.d_model
        self.tok_emb = nn.Embedding(c.vocab_size, D)
        self.prev_emb = ExpertSetEmbedding(L, E, D)  # experts of token t-1, all layers
        self.start = nn.Parameter(torch.zeros(D))  # stands in for "previous experts" at t = 0
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(D, c.n_heads, c.mlp_ratio, c.dropout, c.rope_base) for _ in range(c.n_blocks))
        self.ln_f = nn.LayerNorm(D)
        self.head = HEADS[c.mode](c)
        parts = {
            "skip": lambda: SkipTables(c),
            "memory": lambda: RoutingMemory(L, E, D, c.memory_heads, c.memory_head_dim, c.memory_size, c.ahead),
            "bank": lambda: RoutingBank(c.vocab_size, L, E, c.top_k, c.lookahead, c.bank_beta, c.bank_decay,
                                        c.depth_width, size=c.bank_size, recent=c.bank_recent),
            "gate": lambda: GatePicks(c),
        }
        self.contributors = nn.ModuleDict({name: parts[name]() for name in c.contributors})
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def bank(self) -> RoutingBank | None:
        return self.contributors["bank"] if "bank" in self.contributors else None

    @property
    def memory(self) -> RoutingMemory | None:
        return self.contributors["memory"] if "memory" in self.contributors else None

    # ---------------------------------------------------------------- the one forward

    def forward(
        self,
        token_ids: torch.Tensor,
        experts: torch.Tensor,
        state: PredictorState | None = None,
        layers: slice | None = None,
        exclude: torch.Tensor | None = None,
        sample_positions: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) long, (B, T, L, k) long with -1 padding -> (B, T, n', E) logits for `layers` (all).

        `state` (from `init_state`): these T tokens continue the sequence it holds. `exclude` (B,): each
        row's prompt id, whose own rows the routing bank must not read (training on the split the bank
        holds); with it, `sample_positions` (B, T) (each token's position in its prompt) lets the bank
        memoise its votes across epochs. `gate` (B, T, L, >= G) long, -1 padding: the cross-layer gate's
        picks, for a predictor with gate_inputs = G."""
        self._check(token_ids, experts)
        if gate is not None and gate.shape[:3] != experts.shape[:3]:
            raise ValueError(f"expected gate (B, T, L={self.config.num_layers}, G) like experts "
                             f"{tuple(experts.shape)}, got {tuple(gate.shape)}")
        first = torch.full_like(experts[:, :1], -1)
        if state is not None and state.position > 0:
            first = state.last_experts[:, None]
        prev = torch.cat([first, experts[:, :-1]], dim=1)  # (B, T, L, k)
        ctx = self.context(token_ids, prev, state, exclude, sample_positions)
        out = self.logits(ctx, experts, layers, state, gate=gate)
        if state is not None:
            state.last_experts = experts[:, -1]
        return out

    def context(self, token_ids, prev, state=None, exclude=None, sample_positions=None) -> Context:
        """The trunk: (B, T) ids and (B, T, L, k) previous-token experts -> Context. With a state, the
        previous call's tokens, whose routing `prev` completes, are first handed to the contributors."""
        B, T = token_ids.shape
        offset = 0 if state is None else state.position
        positions = (offset + torch.arange(T, device=token_ids.device)).expand(B, T)
        prev_ids = torch.cat([torch.full_like(token_ids[:, :1], -1), token_ids[:, :-1]], dim=1)  # (B, T)
        caches = [None] * len(self.blocks)
        if state is not None:
            self._commit(state, prev[:, 0])
            if offset:
                prev_ids[:, 0] = state.last_ids
            caches = state.caches
        x = self.tok_emb(token_ids.clamp_min(0)) * (token_ids >= 0).unsqueeze(-1) + self.prev_emb(prev)
        x = self.drop(x + self.start * (prev_ids < 0).unsqueeze(-1))  # "no previous token": t = 0 or padding
        mask = self._padding_mask(token_ids) if state is None else self._served_mask(state, token_ids, offset)
        for block, cache in zip(self.blocks, caches):
            x = block(x, offset, mask, cache)
        ctx = Context(self.ln_f(x), token_ids, prev, positions, exclude, sample_positions, served=state is not None)
        if state is not None:
            state.pending = (ctx.h, token_ids, prev[:, 1:], positions)
            state.position, state.last_ids, state.version, state.ctx = offset + T, token_ids[:, -1], state.version + 1, ctx
        return ctx

    def logits(self, ctx: Context, routed: torch.Tensor, layers: slice | None = None, state=None,
               gate: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Head plus contributors: ctx of T tokens, routed (B, T, L', k) = their experts as far as known
        (-1 or absent beyond) -> (B, T, n', E) for `layers`. Reads routed[:, :, :stop - h] only. `gate`
        (B, T, L'', G): the gate's picks known so far (gate_inputs; layers < stop needed), kept in ctx."""
        if gate is not None:
            ctx.gate = gate
        layers = layers or slice(0, self.config.num_layers)
        if not 0 <= layers.start < layers.stop <= self.config.num_layers:
            raise IndexError(f"layers {layers} outside [0, {self.config.num_layers})")
        h = self.config.ahead
        routed = routed[:, :, : max(0, layers.stop - h)] if h is not None else routed[:, :, :0]
        parts = {} if state is None else state.parts
        depth_in = None
        if self.head.takes_depth_input:
            for name, part in self.contributors.items():
                extra = part.depth_input(ctx, routed, layers.stop, parts.get(name))
                if extra is not None:
                    depth_in = extra if depth_in is None else depth_in + extra
        out = self.head(ctx, routed, layers, depth_in)
        for name, part in self.contributors.items():
            out = out + part.logits(ctx, routed, layers, parts.get(name))
        return out

    # ---------------------------------------------------------------- serving

    def stream(self, budget: int | None = None):
        """A PredictionStream (predictor/stream.py): feed token ids and routed experts, get top-`budget`
        experts per layer as soon as they can be predicted (batch size 1)."""
        from .stream import PredictionStream

        return PredictionStream(self, budget)

    def init_state(self, batch_size: int = 1) -> PredictorState:
        device = self.tok_emb.weight.device
        parts = {name: part.init_state(batch_size, device) for name, part in self.contributors.items()}
        return PredictorState(batch_size, [{} for _ in self.blocks], parts)

    @torch.no_grad()
    def step(self, state: PredictorState, token_ids: torch.Tensor, prev_experts: torch.Tensor | None) -> Context:
        """One decode token per sequence: token_ids (B,), prev_experts (B, L, k) = the previous token's
        routed experts (None at t = 0) -> its Context (also `state.ctx`), for `logits`."""
        if token_ids.dim() != 1 or token_ids.shape[0] != state.batch_size:
            raise ValueError(f"token_ids must be ({state.batch_size},), got {tuple(token_ids.shape)}")
        if (prev_experts is None) != (state.position == 0):
            raise ValueError("prev_experts must be None at the first step (t = 0), and only there")
        L, k = self.config.num_layers, self.config.top_k
        if prev_experts is not None and prev_experts.shape != (state.batch_size, L, k):
            raise ValueError(f"prev_experts must be (B={state.batch_size}, L={L}, k={k}), got {tuple(prev_experts.shape)}")
        if prev_experts is None:
            prev_experts = torch.full((len(token_ids), L, k), -1, dtype=torch.long, device=token_ids.device)
        return self.context(token_ids[:, None], prev_experts[:, None], state)

    def _commit(self, state: PredictorState, prev_first: torch.Tensor) -> None:
        """The previous call's tokens are routed now (`prev_first` (B, L, k) completes the last one)."""
        if state.pending is None:
            return
        h, ids, experts, positions = state.pending
        done = Routed(h, ids, torch.cat([experts, prev_first[:, None]], dim=1), positions)
        for name, part in self.contributors.items():
            part.append(state.parts[name], done)
        state.pending = None

    # ---------------------------------------------------------------- checks and masks

    def _padding_mask(self, token_ids: torch.Tensor) -> torch.Tensor | None:
        """Causal mask that also hides padding keys, or None when plain causal attention is exact.

        Trailing (right) padding never reaches a real token under a causal mask, so only padding
        *before* a real token (left padding, packed rows) needs an explicit mask."""
        pad = token_ids < 0  # (B, T)
        if not bool((pad[:, :-1] & ~pad[:, 1:]).any()):
            return None
        T = token_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=token_ids.device).tril()
        mask = causal & ~pad[:, None, :]  # (B, T, T)
        mask |= torch.eye(T, dtype=torch.bool, device=token_ids.device)  # a padded query sees itself
        return mask[:, None]  # (B, 1, T, T)

    @staticmethod
    def _served_mask(state: PredictorState, token_ids: torch.Tensor, offset: int) -> torch.Tensor | None:
        """`_padding_mask` for a call that continues `state` (`offset` tokens cached): its T queries against
        every cached key and their own, padding keys hidden (a batch's left padding stays in the cache for
        good). Padding is looked for in calls of several tokens (a prompt, as the runtime serves it: the
        check waits for the device), not in one-token steps, which would wait at every token; once seen,
        the state keeps which cached positions are padding and every later call is masked."""
        B, T = token_ids.shape
        if state.pad is None and T == 1:  # a decode step before any padding: nothing to do on the hot path
            return None
        pad = token_ids < 0  # (B, T)
        if state.pad is None:
            if not bool(pad.any()):
                return None
            state.pad = pad.new_zeros(B, offset)
        state.pad = torch.cat([state.pad, pad], dim=1)  # (B, S)
        S = state.pad.shape[1]
        mask = torch.ones(T, S, dtype=torch.bool, device=pad.device).tril(S - T) & ~state.pad[:, None, :]
        i = torch.arange(T, device=pad.device)
        mask[:, i, S - T + i] = True  # a padded query sees itself
        return mask[:, None]  # (B, 1, T, S)

    def _check(self, token_ids: torch.Tensor, experts: torch.Tensor) -> None:
        c = self.config
        for name, t in (("token_ids", token_ids), ("experts", experts)):  # values are not read: no device sync
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{name} must hold integer ids, got a {t.dtype} tensor")
        if experts.shape[:2] != token_ids.shape or experts.shape[2:] != (c.num_layers, c.top_k):
            raise ValueError(
                f"expected token_ids (B, T) and experts (B, T, L={c.num_layers}, k={c.top_k}), "
                f"got {tuple(token_ids.shape)} and {tuple(experts.shape)}"
            )
