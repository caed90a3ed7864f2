"""Incremental serving of the predictor: one token at a time, with a KV cache and the routing
memory's and bank's ring buffers in a PredictorState (the runtime's prefetch drivers use it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bank import BankRows, RecentTokens
from .memory import MemoryState


@dataclass
class PredictorState:
    """Incremental-serving state: one KV cache per context block, and the next position."""

    caches: list[dict]
    position: int = 0
    batch_size: int = 1
    memory: MemoryState | None = None  # routing memory of earlier tokens (memory_heads > 0)
    last_h: torch.Tensor | None = None  # (B, D) c_{t-1}: the memory key of token t-1 needs it
    bank: BankRows | None = None  # the routing bank's rows of the current token (bank_size > 0)
    recent: RecentTokens | None = None  # the prompt's last bank_recent routed tokens (bank_recent > 0)
    last_ids: torch.Tensor | None = None  # (B,) token t-1's id: it joins `recent` once routed


class IncrementalServing:
    """`init_state` / `step` for ExpertPredictor (a mixin: it uses the model's blocks, memory and bank)."""

    def init_state(self, batch_size: int = 1) -> PredictorState:
        state = PredictorState(caches=[{} for _ in self.blocks], position=0, batch_size=batch_size)
        if self.memory is not None:
            p = self.tok_emb.weight
            state.memory = self.memory.init_memory(batch_size, p.device, p.dtype)
        if self.bank is not None:
            state.recent = self.bank.init_recent(batch_size, self.tok_emb.weight.device)
        return state

    def step(
        self, state: PredictorState, token_ids: torch.Tensor, prev_experts: torch.Tensor | None
    ) -> torch.Tensor:
        """Append one token per sequence: token_ids (B,), prev_experts (B, L, k) = the previous token's
        routed experts (None at t = 0) -> context (B, ctx_dim). Updates `state` in place."""
        if token_ids.dim() != 1 or token_ids.shape[0] != state.batch_size:
            raise ValueError(f"token_ids must be ({state.batch_size},), got {tuple(token_ids.shape)}")
        ids = token_ids.view(-1, 1)  # (B, 1)
        L = self.config.num_layers
        if prev_experts is None:
            if state.position != 0:
                raise ValueError("prev_experts may be None only at the first step (t = 0)")
            prev_experts = torch.full((ids.shape[0], L, 1), -1, dtype=torch.long, device=ids.device)
            x = self._token_embed(ids) + self.start  # (B, 1, D)
        else:
            if state.position == 0:
                raise ValueError("the first step has no previous token: pass prev_experts=None")
            x = self._inputs(ids, prev_experts.unsqueeze(1))  # (B, 1, D)
            if self.memory is not None:  # token t-1 is routed now: it joins the memory
                self.memory.append(state.memory, state.last_h, prev_experts)
            if state.recent is not None:  # ... and the prompt's recent tokens the bank reads
                self.bank.append_recent(state.recent, state.last_ids, prev_experts)
        positions = torch.tensor([state.position], device=x.device)
        for block, cache in zip(self.blocks, state.caches):
            x = block(x, positions, None, cache)
        state.position += 1
        if self.bank is not None:
            state.bank = self.bank.lookup(token_ids, state.recent)
            state.last_ids = token_ids
        h = self.ln_f(x)[:, 0]  # (B, D)
        mem = None
        if self.memory is not None:
            state.last_h = h
            if self.config.mode == "token_ahead":
                q = self.memory.queries(h, None, slice(0, self.config.num_layers))
                mem = self.memory.read(state.memory, q, slice(0, self.config.num_layers))  # (B, L, E)
        return self._pack(h, prev_experts, mem)  # (B, ctx_dim)

