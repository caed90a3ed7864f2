"""`collect(cfg)`: load a MoE causal LM and prompts, record routing, write a trace dataset.

`cfg` is a plain mapping (collect.py passes the resolved Hydra config; see conf/collect/collect.yaml for
every key). No Hydra here, so the runtime and notebooks can call it directly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from integrate.adapters import get_adapter, trace_meta_for
from integrate.record import check_gate_ahead, encode_prompts, generation_eos_ids, record_prompts
from predictor.cli import check_model_ref, resolve_device
from predictor.config_schema import check_config
from predictor.prompts import load_prompts
from predictor.token_space import tokenizer_space
from predictor.traces import TraceSet, check_target, write_traces


def load_moe_model(model: str, *, dtype: str = "auto", device: str = "auto", experts_implementation=None):
    """The HF causal LM whose routing is recorded, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    check_model_ref(model)
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except OSError as e:  # not cached offline, no such hub repo, ...: name the key
        raise OSError(f"model={model}: {e}") from e
    return loaded.to(resolve_device(device)).eval()


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set(generation_eos_ids(model))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _portable(ref: str, root: str | None) -> str:
    """A path (model, prompts) under the project's root as relative to it (the demo model is `data/demo/model` in
    every trace set, wherever the clone lies, as in the bundled traces); anything else as given."""
    if root and Path(ref).is_absolute():
        try:
            return str(Path(ref).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return ref


def _check_gate_ahead(model: str, picks: int) -> None:
    """`record_gate_ahead` against the model's k and E, before its weights load: the model is built from
    its config on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model)
    except OSError as e:  # offline and not cached, say: named as the model's load names it
        raise OSError(f"model={model}: {e}") from e
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    check_gate_ahead(skeleton, picks, "record_gate_ahead", f" for {model}")


def _check_sizes(cfg: Mapping, gen: Mapping) -> None:
    """Counts and sampling settings, named, before any work (generate() would refuse some only once
    recording had started, others would pass as "no limit")."""
    def bad(key: str, value, why: str) -> ValueError:
        return ValueError(f"{key}={value!r}: {why}")

    def count(key: str, value, low: int, none_ok: bool = False) -> None:
        if value is None and none_ok:
            return
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # 1e3 from Hydra
        if isinstance(value, bool) or not whole or value < low:
            raise bad(key, value, f"must be an int >= {low}" + (" or null" if none_ok else ""))

    def number(key: str, value) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad(key, value, "must be a number") from None

    count("batch_size", cfg.get("batch_size", 8), 1)
    count("max_prompts", cfg.get("max_prompts"), 1, none_ok=True)
    count("max_prompt_tokens", cfg.get("max_prompt_tokens"), 1, none_ok=True)
    count("record_gate_ahead", cfg.get("record_gate_ahead") or 0, 0)
    count("generate.max_new_tokens", gen.get("max_new_tokens") or 0, 0)
    if gen.get("do_sample"):
        if gen.get("temperature") is not None and not number("generate.temperature", gen["temperature"]) > 0:
            raise bad("generate.temperature", gen["temperature"], "must be > 0 when sampling (do_sample=false is greedy)")
        if gen.get("top_p") is not None and not 0 < number("generate.top_p", gen["top_p"]) <= 1:
            raise bad("generate.top_p", gen["top_p"], "must lie in (0, 1]")
        count("generate.top_k", gen.get("top_k"), 0, none_ok=True)


def _generation_settings(model) -> dict:
    config = getattr(model, "generation_config", None)
    diff = config.to_diff_dict() if config is not None else {}
    return {k: v for k, v in diff.items() if k != "transformers_version"}


def collect(cfg: Mapping) -> TraceSet:
    """Record routing for `cfg["prompts"]` through `cfg["model"]` and write traces to `cfg["out"]`."""
    from transformers import AutoTokenizer, set_seed
    from transformers import __version__ as transformers_version

    check_config(cfg, "collect/collect")  # `+foo=1` and typos: an error naming the key
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    set_seed(int(cfg.get("seed", 0)))
    out = Path(cfg["out"])
    try:  # before the model loads: also refuses to overwrite a directory that is not a trace set
        check_target(out, bool(cfg.get("overwrite", False)))
    except FileExistsError:
        raise FileExistsError(f"{out} exists; pass overwrite=true or choose another out=") from None
    gen = dict(cfg.get("generate") or {})
    max_new = int(gen.get("max_new_tokens", 0) or 0)
    do_sample = bool(gen.get("do_sample", False))
    if max_new and cfg.get("padding_side", "left") != "left":  # before the model loads
        raise ValueError(f"padding_side={cfg.get('padding_side')}: generation (generate.max_new_tokens={max_new}) "
                         "needs left padding, new tokens being appended on the right")  # fmt: skip

    _check_sizes(cfg, gen)
    check_model_ref(str(cfg["model"]), "model")  # a local path that is not there: named before anything is read
    if cfg.get("tokenizer"):
        check_model_ref(str(cfg["tokenizer"]), "tokenizer")
    prompts = load_prompts(  # before the model: a bad prompts file fails in seconds, not after a large load
        str(cfg["prompts"]),
        field=cfg.get("prompt_field"),
        id_field=cfg.get("id_field", "prompt_id"),
        split=cfg.get("split", "train"),
        dataset_config=cfg.get("dataset_config"),
        txt_split=cfg.get("txt_split", "auto"),
    )
    if cfg.get("record_gate_ahead"):
        _check_gate_ahead(str(cfg["model"]), int(cfg["record_gate_ahead"]))
    if cfg.get("max_prompts") is not None:
        prompts = prompts[: int(cfg["max_prompts"])]
    if not prompts:
        raise ValueError(f"no prompts in {cfg['prompts']}")
    model = load_moe_model(
        cfg["model"],
        dtype=cfg.get("dtype", "auto"),
        device=cfg.get("device", "auto"),
        experts_implementation=cfg.get("experts_implementation"),
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.get("tokenizer") or cfg["model"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(
            f"tokenizer of {cfg['model']} has neither a pad nor an eos token to pad batches with"
        )
    use_template = cfg.get("chat_template", "auto")
    use_template = bool(tokenizer.chat_template) if use_template == "auto" else bool(use_template)

    max_tokens = None if cfg.get("max_prompt_tokens") is None else int(cfg["max_prompt_tokens"])
    ids = encode_prompts(tokenizer, [t for _, t in prompts], max_tokens, use_template)

    generate_kwargs = {"do_sample": do_sample}
    if do_sample:
        generate_kwargs.update(
            {k: (int if k == "top_k" else float)(gen[k]) for k in ("temperature", "top_p", "top_k") if gen.get(k) is not None}
        )
    with_weights = bool(cfg.get("record_weights", True))
    gate_ahead = int(cfg.get("record_gate_ahead") or 0)
    root = cfg.get("root_dir")
    meta = trace_meta_for(
        model,
        source_model=_portable(str(cfg["model"]), root),
        tokenizer=_portable(str(cfg.get("tokenizer") or cfg["model"]), root),
        prompt_source=_portable(str(cfg["prompts"]), root),
        has_weights=with_weights,
        gate_ahead=gate_ahead,
        recording={
            "mode": "generate" if max_new else "prefill",
            "max_new_tokens": max_new,
            "do_sample": do_sample,
            **{k: generate_kwargs.get(k) for k in ("temperature", "top_p", "top_k") if do_sample},  # as generate() got them
            # the checkpoint's own generation settings generate() applied too (repetition_penalty, ...)
            **({"generation_config": _generation_settings(model)} if max_new else {}),
            "chat_template": use_template,
            "max_prompt_tokens": max_tokens,
            "padding_side": cfg.get("padding_side", "left"),
            "batch_size": int(cfg.get("batch_size", 8)),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device),
            "experts_implementation": get_adapter(model).spec(model).experts_implementation,
            "seed": int(cfg.get("seed", 0)),
            "transformers": transformers_version,
        },
    )
    meta.token_space = tokenizer_space(tokenizer)  # the ids' vocabulary, wherever the tokenizer was loaded from
    prompt_ids = [pid for pid, _ in prompts]
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"collect: {done}/{total} prompts, {time.perf_counter() - t0:.1f}s", flush=True)

    recorded = record_prompts(  # checks the prompts now (a refused one named by its id); records as it is read
        model, ids, pad_id=pad_id, batch_size=int(cfg.get("batch_size", 8)), padding_side=cfg.get("padding_side", "left"),
        max_new_tokens=max_new, eos_ids=_eos_ids(model, tokenizer), with_weights=with_weights, gate_ahead=gate_ahead,
        generate_kwargs=generate_kwargs if max_new else None, progress=progress, names=prompt_ids,
    )  # fmt: skip

    def records():
        for rec in recorded:
            rec.prompt_id = prompt_ids[rec.prompt_id]
            yield rec

    ts = write_traces(
        out, meta, records(), overwrite=bool(cfg.get("overwrite", False)), source=str(cfg["prompts"])
    )
    secs = time.perf_counter() - t0
    print(
        f"collect: wrote {ts.meta.num_sequences} sequences, {ts.meta.num_tokens} tokens "
        f"({ts.meta.num_tokens / secs:.0f} tokens/s) to {out}",
        flush=True,
    )
    return ts
