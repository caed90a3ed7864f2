"""`collect(cfg)`: load a MoE causal LM and prompts, record routing, write a trace dataset.

`cfg` is a plain mapping (collect.py passes the resolved Hydra config; see conf/collect/collect.yaml for
every key). No Hydra here, so the runtime and notebooks can call it directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from integrate.adapters import get_adapter, trace_meta_for
from integrate.record import encode_prompts, generation_eos_ids, record_prompts
from predictor.config_schema import check_config
from predictor.token_space import tokenizer_space
from predictor.trace_checks import decode_utf8
from predictor.traces import TraceSet, check_target, write_traces

TEXT_FIELDS = ("text", "question", "prompt")  # tried in order when no field is configured


def _pick_field(row: Mapping, field: str | None, where: str) -> str:
    if field is not None:
        if field not in row:
            raise KeyError(f"{where}: no field {field!r}; fields are {sorted(row)}")
        return field
    for name in TEXT_FIELDS:
        if name in row:
            return name
    raise KeyError(f"{where}: none of the fields {TEXT_FIELDS}; set prompt_field to one of {sorted(row)}")


def _rows_to_prompts(rows, field: str | None, id_field: str | None, where: str) -> list[tuple[int, str]]:
    """(prompt_id, text) per row; `rows` yields (label, row), e.g. ("line 3", {...}), for errors. Ids are unique:
    a row without `id_field` takes its index, which must not be another row's explicit id."""
    out, seen = [], {}
    for i, (label, row) in enumerate(rows):
        at = f"{where}: {label}"
        if not isinstance(row, Mapping):
            raise TypeError(f"{at}: expected an object with the prompt text, got {type(row).__name__}")
        text = row[_pick_field(row, field, at)]
        if not isinstance(text, str):
            raise TypeError(f"{at}: prompt field holds {type(text).__name__}, not text")
        own = bool(id_field) and id_field in row
        pid = row[id_field] if own else i
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"{at}: {id_field!r} = {pid!r} is not an integer prompt id")
        how = "" if own else f" (its row index: it has no {id_field!r})"
        if pid in seen:
            raise ValueError(f"{at}: prompt id {pid}{how} is also the id of {seen[pid]}; prompt ids must be unique")
        seen[pid] = label + how
        out.append((pid, text))
    return out


def load_prompts(
    source: str,
    *,
    field: str | None = None,
    id_field: str | None = "prompt_id",
    split: str = "train",
    dataset_config: str | None = None,
    txt_split: str = "auto",
) -> list[tuple[int, str]]:
    """(prompt_id, text) pairs from a .txt/.jsonl file, a saved dataset dir, or a `datasets` name.

    .txt: `txt_split` = "line" (one prompt per line), "blank_line" (paragraphs), or "auto"
    (paragraphs when the file has a blank line, else lines). .jsonl / datasets: the text is
    `field` (default: the first of text, question, prompt); ids come from `id_field` when the
    rows have it, else the row index.
    """
    path = Path(source)
    if path.suffix in (".txt", ".jsonl") and not path.is_file():
        raise FileNotFoundError(f"prompts: no file at {path}")
    if path.suffix == ".txt":
        text = decode_utf8(path.read_bytes(), str(path))
        if txt_split not in ("auto", "line", "blank_line"):
            raise ValueError(f"txt_split must be auto, line or blank_line, got {txt_split!r}")
        paragraphs = txt_split == "blank_line" or (txt_split == "auto" and "\n\n" in text.strip())
        parts = text.split("\n\n") if paragraphs else text.splitlines()
        prompts = [p.strip() for p in parts if p.strip()]
        return list(enumerate(prompts))
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(decode_utf8(path.read_bytes(), str(path)).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i}: not JSON ({e})") from None
        return _rows_to_prompts(rows, field, id_field, str(path))
    if path.suffix in (".json", ".csv", ".parquet", ".tsv"):
        raise ValueError(f"{path}: prompts must be .txt, .jsonl, or a datasets name/directory")
    import datasets

    if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(source, dataset_config, split=split)
    return _rows_to_prompts(((f"row {i}", row) for i, row in enumerate(ds)), field, id_field,
                            f"dataset {source} [{split}]")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """`name` ("auto": cuda when there is one) as a device this machine has; else a ValueError naming `key`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:  # "Expected one of cpu, cuda, ... device type at start of device string"
        raise ValueError(f"{key}={name}: not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name} requested but torch sees no CUDA device")
    return device


def check_model_ref(ref: str, key: str = "model") -> None:
    """A model reference that looks like a local path must exist (transformers would call it a bad repo id)."""
    if Path(ref).expanduser().exists():
        return
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref or ref.endswith("/"):
        raise FileNotFoundError(
            f"{key}={ref}: no such directory (a local model path; a hub name has the form 'org/name')"
        )


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

    if cfg.get("tokenizer"):
        check_model_ref(str(cfg["tokenizer"]), "tokenizer")
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

    prompts = load_prompts(
        str(cfg["prompts"]),
        field=cfg.get("prompt_field"),
        id_field=cfg.get("id_field", "prompt_id"),
        split=cfg.get("split", "train"),
        dataset_config=cfg.get("dataset_config"),
        txt_split=cfg.get("txt_split", "auto"),
    )
    if cfg.get("max_prompts"):
        prompts = prompts[: int(cfg["max_prompts"])]
    if not prompts:
        raise ValueError(f"no prompts in {cfg['prompts']}")
    ids = encode_prompts(tokenizer, [t for _, t in prompts], cfg.get("max_prompt_tokens"), use_template)

    generate_kwargs = {"do_sample": do_sample}
    if do_sample:
        generate_kwargs.update(
            {k: gen[k] for k in ("temperature", "top_p", "top_k") if gen.get(k) is not None}
        )
    with_weights = bool(cfg.get("record_weights", True))
    gate_ahead = int(cfg.get("record_gate_ahead") or 0)
    meta = trace_meta_for(
        model,
        source_model=str(cfg["model"]),
        tokenizer=str(cfg.get("tokenizer") or cfg["model"]),
        prompt_source=str(cfg["prompts"]),
        has_weights=with_weights,
        gate_ahead=gate_ahead,
        recording={
            "mode": "generate" if max_new else "prefill",
            "max_new_tokens": max_new,
            "do_sample": do_sample,
            **{k: gen.get(k) for k in ("temperature", "top_p", "top_k") if do_sample},
            "chat_template": use_template,
            "max_prompt_tokens": cfg.get("max_prompt_tokens"),
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
