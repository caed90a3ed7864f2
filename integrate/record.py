"""Record routing traces from a Hugging Face MoE causal LM: teacher-forced prefill and generation.

Routing is read where it is dispatched: a forward pre-hook on every MoE layer's `mlp.experts`
sees `(hidden, top_k_index, top_k_weights)`, so what is recorded is what the experts computed
(DeepSeek group limits and score-correction bias included), never a recomputed top-k.

One forward call gives every hook one `[rows, k]` tensor: the prefill call `rows = B*T`
(padding included, dropped here with the attention mask), each decode step of `generate`
`rows = B`. A decode step routes the token sampled by the previous step, so a row's trace holds
the prompt plus every generated token that went back through the model: the first
`max_new_tokens` generated tokens, cut before the first end-of-sequence token.

With `gate_ahead` = B > 0 it also records, per token and MoE layer i, the B experts the cross-layer gate
(integrate/runtime/gate.py) picks for layer i from the hidden state entering its decoder layer: what a
Fate-style prefetcher would have fetched, so the evaluation can score and replay it like any predictor.

    python -m integrate.record data/demo/model [--new-tokens 32]   # recording overhead
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from integrate.adapters import get_adapter
from integrate.runtime.gate import layer_gate_picks
from predictor.cli import nonnegative_int, positive_int
from predictor.traces import TraceRecord


class RoutingRecorder:
    """Context manager collecting the ids (and gate weights) each MoE layer's experts receive, and with
    `gate_ahead` = B the cross-layer gate's B picks for each MoE layer."""

    def __init__(self, model: nn.Module, with_weights: bool = True, gate_ahead: int = 0):
        self.model, self.adapter = model, get_adapter(model)
        self.moe_layers = self.adapter.moe_layers(model)
        self._modules = [self.adapter.experts_module(model, layer) for layer in self.moe_layers]
        self.with_weights = with_weights
        self.gate_ahead = gate_ahead
        self._calls: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in self._modules]
        self._gates: list[list[torch.Tensor]] = [[] for _ in self._modules]
        self._handles = []

    def __enter__(self) -> RoutingRecorder:
        for i, module in enumerate(self._modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(i)))
            if self.gate_ahead:
                self._handles.append(self.adapter.layer_input_hook(self.model, self.moe_layers[i], self._gate_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def hook(module, args):
            # every supported MoE block calls experts(hidden, top_k_index, top_k_weights) positionally
            if len(args) != 3:
                raise RuntimeError(
                    f"{type(module).__name__} of MoE layer {self.moe_layers[i]} was called with "
                    f"{len(args)} positional arguments, expected (hidden, top_k_index, top_k_weights)"
                )
            # kept on device: take() copies to host once, not once per layer
            self._calls[i].append((args[1].detach(), args[2].detach() if self.with_weights else None))

        return hook

    def _gate_hook(self, i: int):
        layer = self.moe_layers[i]

        def hook(hidden: torch.Tensor) -> None:  # hidden [B, S, H] entering decoder layer `layer`
            picks = layer_gate_picks(self.adapter, self.model, layer, hidden, self.gate_ahead)[0]
            self._gates[i].append(picks.to(torch.int16))

        return hook

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """Per forward call since the last take: (ids [rows, L, k] int16, weights [rows, L, k] fp32 or None,
        gate_ahead picks [rows, L, B] int16 or None), on CPU."""
        counts = {len(c) for c in self._calls}
        if counts == {0}:
            raise RuntimeError(
                "no expert calls were seen: the MoE blocks did not call mlp.experts "
                "(was the model run inside the recorder? does a hub kernel replace the MoE block?)"
            )
        if len(counts) != 1:
            raise RuntimeError(
                f"MoE layers saw different numbers of expert calls {[len(c) for c in self._calls]}; "
                "was the model run with a layer skipped, or were hooks added mid-forward?"
            )
        if self.gate_ahead and [len(g) for g in self._gates] != [len(c) for c in self._calls]:
            raise RuntimeError(f"the cross-layer gate saw {[len(g) for g in self._gates]} calls per MoE layer, the "
                               f"experts {[len(c) for c in self._calls]}: a decoder layer ran without its MoE block?")
        steps = []
        gates = zip(*self._gates) if self.gate_ahead else [None] * len(self._calls[0])
        for per_layer, gate in zip(zip(*self._calls), gates):
            # int16 on the device (ids < 32768, as the trace format requires): 4x less to copy
            ids = torch.stack([idx for idx, _ in per_layer], dim=1).to(torch.int16).cpu()
            weights = None
            if self.with_weights:
                weights = torch.stack([w for _, w in per_layer], dim=1).to("cpu", torch.float32)
            steps.append((ids, weights, None if gate is None else torch.stack(gate, dim=1).cpu()))
        self._calls = [[] for _ in self._modules]
        self._gates = [[] for _ in self._modules]
        return steps


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) padded on `side` ("left" or "right")."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[b, span] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


def check_vocab(model: nn.Module, seqs: Sequence[Sequence[int]], names: Sequence | None = None) -> None:
    """Refuse, before anything is recorded, a prompt with a token id outside the model's embedding (a
    tokenizer with tokens the model lacks): the error names the prompt (`names[i]`, else its list index)."""
    vocab = model.get_input_embeddings().num_embeddings
    for i, s in enumerate(seqs):
        ids = np.asarray(s, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= vocab)].tolist()
        if bad:
            raise ValueError(f"prompt {names[i] if names is not None else i}: token id {bad[0]} is outside the "
                             f"model's vocabulary of {vocab} embeddings ({len(bad)} such token(s)); does the "
                             "tokenizer add tokens the model was not trained with?")  # fmt: skip


def generation_eos_ids(model: nn.Module) -> list[int]:
    """The end-of-sequence ids of the model's generation config (where generation stops)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return sorted(set(eos if isinstance(eos, list) else [eos] if eos is not None else []))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # as generate() derives them, so a left-padded row is positioned like the unpadded prompt
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def record_batch(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    *,
    pad_id: int,
    padding_side: str = "left",
    max_new_tokens: int = 0,
    eos_ids: Iterable[int] | None = None,
    with_weights: bool = True,
    gate_ahead: int = 0,
    generate_kwargs: dict | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None, int, np.ndarray | None]]:
    """Route one batch of token-id prompts; per prompt: (token_ids, experts, weights, num_prefill,
    gate_ahead picks or None).

    max_new_tokens = 0 records a teacher-forced forward pass; otherwise `model.generate` runs
    (with `generate_kwargs`, e.g. do_sample/temperature) and its decode steps are recorded too, each row
    up to its first end-of-sequence token (`eos_ids`; None: the model's generation config's), not included.
    """
    if max_new_tokens and padding_side != "left":
        raise ValueError("generation needs left padding (new tokens are appended on the right)")
    ids_cpu, mask_cpu = pad_batch(seqs, pad_id, padding_side)
    device = next(model.parameters()).device
    ids, mask = ids_cpu.to(device), mask_cpu.to(device)
    B, T = ids.shape
    with RoutingRecorder(model, with_weights, gate_ahead) as rec:
        if max_new_tokens == 0:
            model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
            generated = []
        else:
            # one step more than kept: the last sampled token is never fed back, so has no routing
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens + 1,
                pad_token_id=pad_id,
                **(generate_kwargs or {}),
            )
            generated = out[:, T:].tolist()
        steps = rec.take()
    if steps[0][0].shape[0] != B * T or any(s[0].shape[0] != B for s in steps[1:]):
        raise RuntimeError(
            f"unexpected expert-call shapes {[tuple(s[0].shape) for s in steps]} for batch {B}x{T}; "
            "expected one prefill call of B*T rows and one call of B rows per decode step"
        )

    def per_token(i: int) -> torch.Tensor | None:  # [B, T + decode steps, L, k]; step s routed token s-1
        if steps[0][i] is None:
            return None
        prefill = steps[0][i].view(B, T, *steps[0][i].shape[1:])
        if len(steps) == 1:
            return prefill
        return torch.cat([prefill, *(s[i].unsqueeze(1) for s in steps[1:])], dim=1)

    all_ids, all_w, all_g = per_token(0), per_token(1), per_token(2)
    n_gen = min(len(steps) - 1, max_new_tokens)
    eos = set(int(e) for e in (generation_eos_ids(model) if eos_ids is None else eos_ids))
    rows = []
    for b in range(B):
        prompt = mask_cpu[b].bool()
        gen = generated[b][:n_gen] if n_gen else []
        cut = next((i for i, tok in enumerate(gen) if tok in eos), len(gen))
        decoded = torch.arange(len(steps) - 1) < cut  # decode steps whose token is kept
        keep = torch.cat([prompt, decoded])
        token_ids = np.concatenate([ids_cpu[b][prompt].numpy(), np.asarray(gen[:cut], dtype=np.int64)])
        weights = all_w[b][keep].numpy() if all_w is not None else None
        gate = all_g[b][keep].numpy() if all_g is not None else None
        rows.append((token_ids, all_ids[b][keep].numpy(), weights, int(prompt.sum()), gate))
    return rows


def encode_prompts(
    tokenizer, prompts: Sequence[str], max_prompt_tokens: int | None, chat_template: bool
) -> list[list[int]]:
    """Token ids per prompt; with `chat_template`, each prompt becomes one user turn.

    max_prompt_tokens limits the prompt text; a chat template's own tokens come on top of it.
    """
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template requested but the tokenizer has none; set chat_template=false")
    out = []
    for text in prompts:
        if chat_template:
            if max_prompt_tokens:
                text = tokenizer.decode(
                    tokenizer(text, add_special_tokens=False).input_ids[:max_prompt_tokens]
                )
            templated = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(templated, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(text).input_ids[: max_prompt_tokens or None]
        out.append(list(ids))
    return out


def check_gate_ahead(model: nn.Module, picks: int, key: str = "gate_ahead", where: str = "") -> None:
    """The gate's picks per MoE layer: 0 (none) or from top_k to num_experts, the trace format's range (the
    gate would clamp more and keep fewer than the meta says)."""
    spec = get_adapter(model).spec(model)
    if picks and not spec.top_k <= picks <= spec.num_experts:
        raise ValueError(f"{key}={picks}: the gate's picks per MoE layer, 0 (none) or from top_k to num_experts, "
                         f"[{spec.top_k}, {spec.num_experts}]{where}")


def record_prompts(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    padding_side: str = "left",
    max_new_tokens: int = 0,
    eos_ids: Iterable[int] | None = None,
    with_weights: bool = True,
    gate_ahead: int = 0,
    generate_kwargs: dict | None = None,
    progress=None,
    names: Sequence | None = None,
) -> Iterator[TraceRecord]:
    """TraceRecords for tokenised prompts, batched by length (less padding); prompt_id = list index. A prompt
    of no tokens has no routing to record: it is skipped with a warning; one with a token id the model has
    no embedding for is refused before any is recorded, named by `names[i]` (default: its index). `eos_ids`:
    as `record_batch`'s."""
    if max_new_tokens and padding_side != "left":  # (record_batch's check, before any batch runs)
        raise ValueError("generation needs left padding (new tokens are appended on the right)")
    check_vocab(model, prompt_ids, names)  # (here, not in the generator below: at the call, before any batch)
    check_gate_ahead(model, gate_ahead)
    empty = [i for i, s in enumerate(prompt_ids) if not len(s)]
    if empty:
        which = [names[i] for i in empty] if names is not None else empty
        warnings.warn(f"{len(empty)} prompt(s) tokenize to no tokens and are not recorded "
                      f"({'prompts' if names is not None else 'list indices'} {which[:10]}"
                      f"{' …' if len(empty) > 10 else ''})", stacklevel=2)
    order = sorted((i for i, s in enumerate(prompt_ids) if len(s)), key=lambda i: len(prompt_ids[i]))
    eos_ids = generation_eos_ids(model) if eos_ids is None else list(eos_ids)
    kw = dict(pad_id=pad_id, padding_side=padding_side, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
              with_weights=with_weights, gate_ahead=gate_ahead, generate_kwargs=generate_kwargs)  # fmt: skip
    return _record_batches(model, prompt_ids, order, batch_size, progress, kw)


def _record_batches(model, prompt_ids, order: list[int], batch_size: int, progress, kw: dict) -> Iterator[TraceRecord]:
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = record_batch(model, [prompt_ids[i] for i in chunk], **kw)
        for i, (token_ids, experts, weights, num_prefill, gate) in zip(chunk, rows):
            yield TraceRecord(i, token_ids, experts, num_prefill, weights, gate)
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))


@torch.no_grad()
def recording_overhead(
    model: nn.Module, batch_size: int = 8, seq_len: int = 128, max_new_tokens: int = 0, repeats: int = 5
) -> dict:
    """Best-of-`repeats` seconds for random prompts: plain forward (or generate) vs `record_batch`.

    The recorded side is the whole recording path (hooks, host copy, row assembly); with
    generation it also pays the one extra decode step record_batch needs. Runs alternate, so
    a noisy machine slows both sides alike.
    """
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=g).tolist()
    ids = torch.tensor(seqs, device=device)
    mask = torch.ones_like(ids)
    # min_new_tokens: no early eos, so both sides do the same work (record_batch asks one more)
    fixed = {"min_new_tokens": max_new_tokens, "do_sample": False}

    def plain():
        if max_new_tokens:
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=0, **fixed
            )
        else:
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def recorded():
        kwargs = {**fixed, "min_new_tokens": max_new_tokens + 1}
        record_batch(model, seqs, pad_id=0, max_new_tokens=max_new_tokens, generate_kwargs=kwargs)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    plain(), recorded()  # warm-up
    times = [(timed(plain), timed(recorded)) for _ in range(repeats)]
    best_plain, best_rec = min(t[0] for t in times), min(t[1] for t in times)
    return {
        "prompt_tokens": batch_size * seq_len,
        "new_tokens": batch_size * max_new_tokens,
        "plain_s": best_plain,
        "recorded_s": best_rec,
        "overhead": best_rec / best_plain - 1,
    }


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from predictor.cli import check_model_ref, resolve_device

    p = argparse.ArgumentParser(prog="python -m integrate.record", description="Recording overhead of integrate.record against a plain forward")
    p.add_argument("model", help="local path or hub name of a MoE causal LM")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--new-tokens", type=nonnegative_int, default=0, help="> 0: time generation instead of one forward")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=1, help="torch's host threads (1: steady timings on shared cores)")
    a = p.parse_args(argv)
    try:  # before the model loads: a device this machine lacks, a local path that is not there
        device = resolve_device(a.device, "--device")
        check_model_ref(a.model, "model")
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=a.dtype).to(device).eval()
    r = recording_overhead(model, a.batch_size, a.seq_len, a.new_tokens, a.repeats)
    print(
        f"{a.model} on {a.device}: {r['prompt_tokens']} prompt + {r['new_tokens']} new tokens, "
        f"plain {r['plain_s'] * 1e3:.1f} ms, recorded {r['recorded_s'] * 1e3:.1f} ms, "
        f"overhead {100 * r['overhead']:+.1f}%"
    )


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
