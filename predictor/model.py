"""The expert-activation predictor: a small causal transformer over tokens (plain torch).

Inputs at token position t (B = batch, T = tokens, L = MoE layers, E = experts, k = top_k, D = d_model):

    x_t = embed(token_t) + sum_{l, j} embed_prev[l, experts[t-1, l, j]]      (a learned "start" vector at t = 0)

A causal transformer (RoPE, pre-norm) turns x_{<=t} into a context vector c_t. Then

* ``token_ahead``: a head maps c_t to (L, E) logits for token t: usable before token t's forward pass.
* ``layer_ahead`` with lookahead h: a small *depth* transformer runs over the L layer positions of
  token t. Depth position l gets ``c_t + embed_layer[l] + sum_{l' <= l-h} sum_j embed_cur[l', experts[t, l', j]]``
  (nothing from the current token when l - h < 0: the running sum hands every position the whole
  history it may see, not just layer l - h) and attends causally over depth, so the output at position
  l has seen exactly token t's expert sets at layers <= l - h: h layers of lead time. With ``depth_last``
  position l also gets a separate embedding of layer l - h alone (the running sum dilutes the nearest
  layer, which tells the most).
* ``skip_tables`` (default on) add "wide" linear paths straight to the logits: one (L*E x L*E) table from
  the previous token's experts at every layer to every layer's logits, and (layer_ahead) one from token
  t's experts at layers l' <= l - h to layer l's logits (masked block-triangular). Reading *all* earlier
  layers rather than only the same layer (prev) or layer l - h (current) is what lifts layer_ahead
  (the ablation: experiments/wide_tables.py, figures in the README).

* ``memory_heads > 0`` adds a routing memory (``predictor/memory.py``): attention from (t, l) over the last
  ``memory_size`` tokens, reading how each routed at layer l, with queries and keys from the context vectors
  and (layer_ahead) the routing at layers <= l - h. Its logits are added like the skip tables'.
* ``bank_size > 0`` (layer_ahead) adds a routing bank (``predictor/bank.py``): a vote over the training-set
  occurrences of token t's id, weighted by how their routing at layers <= l - h agrees with token t's.
  The vote goes into the depth input at l and, through learned gains, into the logits. With
  ``bank_recent > 0`` the prompt's own last ``bank_recent`` tokens of the same id vote with the bank's rows
  (serving keeps them in ``state.recent``, a ring buffer).

Causality contract: ``logits[:, t, l]`` depends only on ``token_ids[:, :t+1]``, ``experts[:, :t]`` and,
in layer_ahead mode, ``experts[:, t, :l-h+1]``. Expert id -1 is padding (zero embedding); token id -1
is padding (zero embedding, never attended to by real tokens).

Serving runs incrementally: ``init_state`` / ``step`` keep a KV cache (and the routing memory's ring
buffer, ``state.memory``) and return an opaque context vector (B, ctx_dim) (c_t, plus the previous token's
skip logits and, token_ahead, the memory's); ``token_logits`` and ``layer_logits(ctx, cur, layer,
state.memory)`` decode one token from it (``tests/test_model.py`` checks that this equals ``forward``).

This module imports neither Hydra nor Lightning: the offloading runtime loads it directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .bank import BankRows, RoutingBank
from .blocks import Block
from .config import MODES, PredictorConfig, PredictorConfigError  # noqa: F401  (imported from here)
from .embeddings import ExpertSetEmbedding, expert_multi_hot
from .memory import MemoryState, RoutingMemory
from .serving import IncrementalServing, PredictorState  # noqa: F401  (imported from here)


class ExpertPredictor(IncrementalServing, nn.Module):
    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config.validate()
        c = config
        L, E, D = c.num_layers, c.num_experts, c.d_model
        self.tok_emb = nn.Embedding(c.vocab_size, D)
        self.prev_emb = ExpertSetEmbedding(L, E, D)  # experts of token t-1, all layers
        self.start = nn.Parameter(torch.zeros(D))  # stands in for "previous experts" at t = 0
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(D, c.n_heads, c.mlp_ratio, c.dropout, c.rope_base) for _ in range(c.n_blocks)
        )
        self.ln_f = nn.LayerNorm(D)
        if c.skip_tables:
            self.prev_skip = ExpertSetEmbedding(L, E, L * E)  # prev token, all layers -> logits of all layers
            if c.mode == "layer_ahead":
                # current token, layer l' -> logits of layer l, used only where l' <= l - h
                self.cur_skip = ExpertSetEmbedding(L, E, L * E)
                src, tgt = torch.arange(L)[:, None], torch.arange(L)[None, :]
                causal = (src <= tgt - c.lookahead).to(torch.float32)  # (L_src, L_tgt)
                self.register_buffer("cur_skip_mask", causal[:, None, :, None], persistent=False)
        if c.memory_heads:
            lookahead = c.lookahead if c.mode == "layer_ahead" else None
            self.memory = RoutingMemory(L, E, D, c.memory_heads, c.memory_head_dim, c.memory_size, lookahead)
        else:
            self.memory = None
        if c.mode == "token_ahead":
            self.head = nn.Linear(D, L * E)
        else:
            W = c.depth_width
            self.ctx_proj = nn.Linear(D, W) if W != D else nn.Identity()
            self.layer_emb = nn.Parameter(torch.zeros(L, W))
            self.cur_emb = ExpertSetEmbedding(L, E, W)  # current token's experts, per layer
            self.last_emb = ExpertSetEmbedding(L, E, W) if c.depth_last else None  # layer l - h alone
            self.depth_blocks = nn.ModuleList(
                Block(W, c.depth_heads, c.mlp_ratio, c.dropout, None) for _ in range(c.depth_blocks)
            )
            self.depth_ln = nn.LayerNorm(W)
            self.head_w = nn.Parameter(torch.empty(L, W, E))  # per-layer heads
            self.head_b = nn.Parameter(torch.zeros(L, E))
        self.bank = None
        if c.bank_size:
            self.bank = RoutingBank(
                c.vocab_size, L, E, c.top_k, c.bank_entries, c.lookahead, c.bank_beta, c.bank_decay, c.depth_width,
                recent=c.bank_recent,
            )
        self.apply(self._init_weights)
        for name in ("prev_skip", "cur_skip"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name).weight)  # start from the transformer alone
        if self.memory is not None:
            nn.init.zeros_(self.memory.gain_lin)  # zero gains: the memory starts silent (self.apply touched none)
            nn.init.zeros_(self.memory.gain_log)
        if c.mode == "layer_ahead":
            nn.init.normal_(self.layer_emb, std=0.02)
            nn.init.normal_(self.head_w, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- full-sequence forward

    def _token_embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, -1 = padding -> (B, T, D)."""
        return self.tok_emb(token_ids.clamp_min(0)) * (token_ids >= 0).unsqueeze(-1)

    def _inputs(self, token_ids: torch.Tensor, prev_experts: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and (B, T, L, k) experts of the *previous* token -> (B, T, D)."""
        return self._token_embed(token_ids) + self.prev_emb(prev_experts)

    @property
    def _extra_logits(self) -> bool:
        """Does the context carry L*E logits (skip tables; token_ahead memory, which depends on t only)?"""
        c = self.config
        return c.skip_tables or (self.memory is not None and c.mode == "token_ahead")

    @property
    def ctx_dim(self) -> int:
        """Width of the context vector: d_model, plus L*E logits when `_extra_logits`."""
        c = self.config
        return c.d_model + (c.num_layers * c.num_experts if self._extra_logits else 0)

    def _pack(self, h: torch.Tensor, prev_experts: torch.Tensor, memory_logits=None) -> torch.Tensor:
        """h (..., D), prev_experts (..., L, k), memory_logits (..., L, E) or None -> ctx (..., ctx_dim)."""
        if not self._extra_logits:
            return h
        c = self.config
        extra = h.new_zeros(*h.shape[:-1], c.num_layers * c.num_experts)
        if c.skip_tables:
            extra = extra + self.prev_skip(prev_experts)  # (..., L*E)
        if memory_logits is not None:
            extra = extra + memory_logits.flatten(-2)
        return torch.cat([h, extra], dim=-1)

    def _unpack(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ctx (..., ctx_dim) -> h (..., D), extra logits (..., L, E) or None."""
        c = self.config
        if ctx.shape[-1] != self.ctx_dim:
            raise ValueError(f"ctx must have width ctx_dim={self.ctx_dim}, got {ctx.shape[-1]}")
        if not self._extra_logits:
            return ctx, None
        return ctx[..., : c.d_model], ctx[..., c.d_model :].unflatten(-1, (c.num_layers, c.num_experts))

    def context(self, token_ids: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, (B, T, L, k) expert ids -> (B, T, ctx_dim) context (uses experts[:, :t] only).

        The context is opaque to callers: pass it to token_logits / layer_logits. Its first d_model
        entries are the transformer state c_t; with skip_tables it also carries the previous token's
        per-layer skip logits (L*E), so incremental serving needs nothing else from the past.
        """
        B, T = token_ids.shape
        self._check(token_ids, experts)
        prev = torch.cat([torch.full_like(experts[:, :1], -1), experts[:, :-1]], dim=1)  # (B, T, L, k)
        x = self._inputs(token_ids, prev)
        # the start vector marks "no previous token": t = 0, or the previous position is padding
        prev_ids = torch.cat([torch.full_like(token_ids[:, :1], -1), token_ids[:, :-1]], dim=1)  # (B, T)
        x = x + self.start * (prev_ids < 0).unsqueeze(-1)
        x = self.drop(x)
        positions = torch.arange(T, device=x.device)
        attn_mask = self._padding_mask(token_ids)
        for block in self.blocks:
            x = block(x, positions, attn_mask)
        h = self.ln_f(x)
        mem = None
        if self.memory is not None and self.config.mode == "token_ahead":
            mem = self.memory(h, experts, token_ids >= 0)  # (B, T, L, E)
        return self._pack(h, prev, mem)  # (B, T, ctx_dim)

    def forward(
        self,
        token_ids: torch.Tensor,
        experts: torch.Tensor,
        exclude: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) long, (B, T, L, k) long with -1 padding -> (B, T, L, E) logits.

        `exclude` (B,): the sequence (prompt) id of each row, whose own rows the routing bank must not
        read (training on the split the bank was built from); None elsewhere. With it, `positions`
        (B, T) (each token's position in its sequence) lets the bank memoise its votes across epochs."""
        ctx = self.context(token_ids, experts)  # (B, T, ctx_dim)
        if self.config.mode == "token_ahead":
            return self.token_logits(ctx)
        vote = None
        if self.bank is not None:
            vote = self.bank.sequence_votes(token_ids, experts, exclude, positions).flatten(0, 1)  # (B*T, L, E)
        out = self._depth_logits(ctx, experts, vote)
        if self.memory is not None:
            out = out + self.memory(ctx[..., : self.config.d_model], experts, token_ids >= 0)
        return out

    def _padding_mask(self, token_ids: torch.Tensor) -> torch.Tensor | None:
        """Causal mask that also hides padding keys, or None when plain causal attention is exact.

        Trailing (right) padding never reaches a real token under a causal mask, so only padding
        *before* a real token (left padding, packed rows) needs an explicit mask.
        """
        pad = token_ids < 0  # (B, T)
        if not bool((pad[:, :-1] & ~pad[:, 1:]).any()):
            return None
        T = token_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=token_ids.device).tril()
        mask = causal & ~pad[:, None, :]  # (B, T, T)
        mask |= torch.eye(T, dtype=torch.bool, device=token_ids.device)  # a padded query sees itself
        return mask[:, None]  # (B, 1, T, T)

    def _check(self, token_ids: torch.Tensor, experts: torch.Tensor) -> None:
        c = self.config
        if experts.shape[:2] != token_ids.shape or experts.shape[2:] != (c.num_layers, experts.shape[-1]):
            raise ValueError(
                f"expected token_ids (B, T) and experts (B, T, L={c.num_layers}, k), "
                f"got {tuple(token_ids.shape)} and {tuple(experts.shape)}"
            )

    # ---------------------------------------------------------------- heads

    def token_logits(self, ctx: torch.Tensor) -> torch.Tensor:
        """(..., ctx_dim) -> (..., L, E): token_ahead prediction for every layer of the token."""
        if self.config.mode != "token_ahead":
            raise RuntimeError("token_logits needs mode='token_ahead'; this predictor is layer_ahead")
        c = self.config
        h, skip = self._unpack(ctx)
        out = self.head(h).unflatten(-1, (c.num_layers, c.num_experts))
        return out if skip is None else out + skip

    def _depth_inputs(self, h: torch.Tensor, cur_experts: torch.Tensor, n: int) -> torch.Tensor:
        """h (N, D), cur_experts (N, L', k) -> depth inputs for layer positions [0, n): (N, n, W)."""
        lh = self.config.lookahead
        z = self.ctx_proj(h).unsqueeze(1) + self.layer_emb[:n]  # (N, n, W)
        m = min(n - lh, cur_experts.shape[1])  # positions l >= h see layer l - h of the current token
        if m > 0:
            cur = self.cur_emb.per_layer(cur_experts[:, :m]).cumsum(1)  # (N, m, W): layers <= l - h
            if self.last_emb is not None:
                cur = cur + self.last_emb.per_layer(cur_experts[:, :m])  # (N, m, W): layer l - h
            z = torch.cat([z[:, :lh], z[:, lh : lh + m] + cur, z[:, lh + m :]], dim=1)
        return z

    def _depth(self, z: torch.Tensor, layers: slice) -> torch.Tensor:
        """Depth transformer over (N, n, W) then per-layer heads for `layers` -> (N, n', E)."""
        for block in self.depth_blocks:
            z = block(z)  # causal over depth
        z = self.depth_ln(z[:, layers])
        return torch.einsum("nlw,lwe->nle", z, self.head_w[layers]) + self.head_b[layers]

    def _cur_skip(self, cur_experts: torch.Tensor, layers: slice) -> torch.Tensor:
        """Skip logits from the current token's layers l' <= l - h, for l in `layers`: (N, n', E)."""
        n, E = cur_experts.shape[1], self.config.num_experts
        hot = expert_multi_hot(cur_experts, E, self.cur_skip.weight.dtype).flatten(-2)  # (N, n*E)
        table = self.cur_skip.weight[:n].unflatten(-1, (self.config.num_layers, E))[:, :, layers]
        table = table * self.cur_skip_mask[:n, :, layers]  # (n, E, n', E): zero where l' > l - h
        return (hot @ table.flatten(0, 1).flatten(-2)).unflatten(-1, (-1, E))  # (N, n', E)

    def _layer_ahead_logits(
        self,
        ctx: torch.Tensor,
        cur_experts: torch.Tensor,
        layers: slice,
        memory: MemoryState | None = None,
        vote: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ctx (N, ctx_dim), cur_experts (N, L', k) -> (N, n', E) for `layers` (a slice starting <= stop).

        `memory` (serving only) adds the routing-memory logits; the full forward adds them batched.
        `vote` (N, >= stop, E): the routing bank's votes, fed to the depth inputs and the logits."""
        h, skip = self._unpack(ctx)
        z = self._depth_inputs(h, cur_experts, layers.stop)
        if vote is not None:
            z = z + self.bank.proj(vote[:, : layers.stop])
        out = self._depth(z, layers)
        if vote is not None:
            out = out + self.bank.readout(vote[:, layers], layers)
        if skip is not None:
            out = out + skip[:, layers] + self._cur_skip(cur_experts, layers)
        if memory is not None:
            out = out + self.memory.read(memory, self.memory.queries(h, cur_experts, layers), layers)
        return out

    def _check_state(self, memory: MemoryState | None, bank: BankRows | None) -> None:
        if (memory is None) != (self.memory is None):
            raise ValueError(
                "this predictor has a routing memory: pass memory=state.memory"
                if memory is None
                else "memory given, but this predictor has no routing memory (memory_heads=0)"
            )
        if (bank is None) != (self.bank is None):
            raise ValueError(
                "this predictor has a routing bank: pass bank=state.bank"
                if bank is None
                else "bank given, but this predictor has no routing bank (bank_size=0)"
            )

    def _depth_logits(self, ctx: torch.Tensor, experts: torch.Tensor, vote: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = ctx.shape
        L = self.config.num_layers
        out = self._layer_ahead_logits(
            ctx.reshape(B * T, -1), experts.reshape(B * T, L, -1), slice(0, L), vote=vote
        )
        return out.view(B, T, L, -1)  # (B, T, L, E)

    def layer_logits(
        self,
        ctx: torch.Tensor,
        cur_experts: torch.Tensor,
        layer: int,
        memory: MemoryState | None = None,
        bank: BankRows | None = None,
    ) -> torch.Tensor:
        """layer_ahead: ctx (B, ctx_dim), cur_experts (B, L', k) -> (B, E) logits for MoE layer `layer`.

        Reads only cur_experts[:, :layer - h + 1] (the current token's layers already routed h layers
        back); later columns may hold anything (e.g. -1) and may be absent. A predictor with a routing
        memory needs `memory=state.memory`, one with a routing bank `bank=state.bank` (the state `step`
        returned ctx from).
        """
        c = self.config
        if c.mode != "layer_ahead":
            raise RuntimeError("layer_logits needs mode='layer_ahead'; this predictor is token_ahead")
        if not 0 <= layer < c.num_layers:
            raise IndexError(f"layer {layer} outside [0, {c.num_layers})")
        self._check_state(memory, bank)
        known = max(0, layer - c.lookahead + 1)
        cur = cur_experts[:, :known]
        vote = None if bank is None else self.bank.vote(bank, cur, layer + 1)
        return self._layer_ahead_logits(ctx, cur, slice(layer, layer + 1), memory, vote)[:, 0]

    def all_layer_logits(
        self,
        ctx: torch.Tensor,
        cur_experts: torch.Tensor,
        memory: MemoryState | None = None,
        bank: BankRows | None = None,
    ) -> torch.Tensor:
        """layer_ahead, all layers at once: ctx (B, ctx_dim), cur_experts (B, L, k) -> (B, L, E)."""
        self._check_state(memory, bank)
        L = self.config.num_layers
        vote = None if bank is None else self.bank.vote(bank, cur_experts, L)
        return self._layer_ahead_logits(ctx, cur_experts, slice(0, L), memory, vote)
