"""The predictor on the Hugging Face Hub (plain torch + huggingface_hub; no Hydra, no Lightning).

Predictors (`ExpertPredictor` inherits `PredictorHubMixin`, huggingface_hub's `PyTorchModelHubMixin`):

    model.save_pretrained("dir")          # dir/predictor.safetensors (the self-describing export format),
                                          # dir/config.json (the PredictorConfig) and dir/README.md (model card)
    model.push_to_hub("owner/name")       # the same three files, one commit
    ExpertPredictor.from_pretrained("owner/name" | "dir" | "file.safetensors" | "file.ckpt")
                                          # always through predictor.export.load_predictor

Trace sets go up as dataset repos: predictor/hub_traces.py (`push_trace_set`, `load_traces("hf://datasets/...")`).

`python -m predictor.hub push-predictor FILE REPO_ID | push-traces DIR REPO_ID | save FILE DIR`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import PyTorchModelHubMixin

from .atomic import write_text_atomic
from .hub_traces import is_hub_uri, parse_hub_uri

WEIGHTS_NAME = "predictor.safetensors"
CONFIG_NAME = "config.json"
LIBRARY = "moe-prefetch"


# ---------------------------------------------------------------- predictors


class PredictorHubMixin(PyTorchModelHubMixin):
    """save_pretrained / push_to_hub / from_pretrained for ExpertPredictor, in the export format.

    `predictor_meta` (a dict: source model, trace set, metrics, the training command, ...) travels with
    the model: `load_predictor` sets it from the file, training sets it before export, and
    save_pretrained writes it into predictor.safetensors and the model card."""

    predictor_meta: dict | None = None

    def _save_pretrained(self, save_directory: Path) -> None:
        from .export import export_predictor, read_predictor_meta

        path = export_predictor(self, save_directory / WEIGHTS_NAME, dict(self.predictor_meta or {}))
        config, meta = read_predictor_meta(path)  # the card shows exactly what the file holds
        write_text_atomic(save_directory / CONFIG_NAME, json.dumps(config.to_dict(), indent=2, sort_keys=True))
        write_text_atomic(save_directory / "README.md", str(model_card(meta)))

    def generate_model_card(self, *args, **kwargs):
        from .jsonable import to_jsonable

        c = self.config
        meta = {"num_layers": c.num_layers, "num_experts": c.num_experts, "top_k": c.top_k, "mode": c.mode,
                "lookahead": c.ahead, "gate_inputs": c.gate_inputs, "vocab_size": c.vocab_size,
                **(self.predictor_meta or {})}  # fmt: skip
        return model_card(to_jsonable(meta))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A Hub repo id, a directory written by save_pretrained, or a predictor file (.safetensors from
        `export_predictor`, Lightning .ckpt): the model in eval mode, `predictor_meta` set from the file."""
        from .export import load_predictor

        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if path.is_file():
            return load_predictor(path, kwargs.get("map_location", "cpu"))
        if (path / CONFIG_NAME).is_file():  # the mixin reads it first: a broken one is named, not a bare JSON error
            _check_config_json(path / CONFIG_NAME)
        if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1
                                  or path.suffix in (".safetensors", ".ckpt")):  # fmt: skip
            raise FileNotFoundError(f"no predictor directory or file at {name} (nor is it a Hub repo id 'owner/name')")
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            return super().from_pretrained(name, **kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError) as e:
            raise FileNotFoundError(f"{name}: no predictor repo on the Hub or in the HF cache ({e})") from e

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token,
                         map_location="cpu", config=None, **unexpected):  # fmt: skip
        from huggingface_hub import hf_hub_download

        from .config import PredictorConfig
        from .export import PredictorFileError, load_predictor

        if unexpected:
            raise TypeError(f"from_pretrained: unexpected arguments {sorted(unexpected)}")
        if os.path.isdir(model_id):
            path = Path(model_id) / WEIGHTS_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{model_id}: no {WEIGHTS_NAME} (save_pretrained writes one)")
        else:
            path = Path(hf_hub_download(model_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                                        force_download=force_download, token=token,
                                        local_files_only=local_files_only))  # fmt: skip
        model = load_predictor(path, map_location)
        if config is not None:  # config.json, as the mixin decoded it: it must agree with the file
            theirs = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            ours = model.config.to_dict()
            try:
                theirs = PredictorConfig.from_dict(theirs).to_dict()
            except ValueError as e:
                raise PredictorFileError(f"{model_id}/{CONFIG_NAME}: {e}") from e
            bad = sorted(k for k in ours if ours[k] != theirs.get(k))
            if bad:
                raise PredictorFileError(
                    f"{model_id}: {CONFIG_NAME} disagrees with {WEIGHTS_NAME} on {bad}; the .safetensors file is "
                    "authoritative (re-save with save_pretrained)"
                )
        return model


def _pct(value) -> str:
    if isinstance(value, (int, float)) and 0.0 <= value <= 1.0 and not isinstance(value, bool):
        return f"{100 * value:.1f} %"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def model_card(meta: dict):
    """A ModelCard from an exported predictor's meta (`read_predictor_meta`): the source model, the trace
    set and its token space, mode and lookahead, the held-out metrics and the command behind them."""
    from huggingface_hub import ModelCard, ModelCardData

    source = meta.get("source_model") or "unknown"
    mode, h = meta.get("mode"), meta.get("lookahead")
    traces = meta.get("traces")
    datasets = [parse_hub_uri(traces)[0]] if is_hub_uri(traces) else None
    keys = ("source_model", "architecture", "num_layers", "num_experts", "top_k", "vocab_size", "token_space",
            "tokenizer", "vocab_file", "traces", "split", "split_seed", "val_split", "mode", "lookahead", "gate_inputs",
            "command")
    data = ModelCardData(library_name=LIBRARY, tags=["mixture-of-experts", "expert-prefetch", "moe-offloading"],
                         datasets=datasets, moe_prefetch={k: meta.get(k) for k in keys if k in meta})  # fmt: skip
    if meta.get("tokenizer"):
        space = f"token ids of the tokenizer `{meta['tokenizer']}`"
    elif meta.get("vocab_file"):
        space = f"ids of the trace set's `{meta['vocab_file']}` (token strings numbered by the import)"
    else:
        space = "token ids as stored in the trace set"
    what = ("every MoE layer of token t before its forward pass starts" if mode == "token_ahead" else
            f"layer l of token t from the same token's routing at layers <= l - {h} (lookahead h = {h})")  # fmt: skip
    gate = meta.get("gate_inputs") or 0
    if gate:
        what += (f" and the cross-layer gate's top-{gate} picks for layer l (its router on the hidden state leaving "
                 "layer l - 1; the prediction comes once that layer has run, and the runtime computes the picks)")
    split = meta.get("split")
    held_out = meta.get("val_split", "val")
    rows = [
        ("source model", f"`{source}` ({meta.get('architecture', '?')})"),
        ("MoE layers x routed experts, top-k", f"{meta.get('num_layers')} x {meta.get('num_experts')}, "
                                                f"k = {meta.get('top_k')}"),  # fmt: skip
        ("trace set", f"`{traces}`" + (f", split {split} by prompt (seed {meta.get('split_seed')}), "
                                        f"held out: `{held_out}`" if split else "")),  # fmt: skip
        ("token space", f"{space}; vocabulary {meta.get('vocab_size')}"
                        + (f"; identity `{meta['token_space']}`" if meta.get("token_space") else "")),
        ("mode", f"`{mode}`" + (f", lookahead h = {h}" if mode == "layer_ahead" else "")
                 + (f", reads {gate} gate picks per layer (`gate_inputs`; timing `layer_output`)" if gate else "")),
        ("parameters", f"{meta['num_params']:,}" if "num_params" in meta else "?"),
    ]
    metrics = meta.get("metrics") or {}
    command = meta.get("command")
    lines = [
        f"# Expert-activation predictor for {source}",
        "",
        f"A moe-prefetch predictor: a small causal model that reads the tokens and the experts "
        f"{source} routed them to, and predicts {what}, so an offloading runtime can prefetch experts.",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        f"## Held-out metrics (split `{held_out}`)",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |", *[f"| {k} | {_pct(v)} |" for k, v in metrics.items()]]
    else:
        lines.append("No held-out metrics were recorded with this file.")
    lines += [
        "",
        f"Produced by `{command}` (the final validation of the best checkpoint)." if command else
        "The command that produced this file was not recorded.",
        "",
        "## Use",
        "",
        "```python",
        "from predictor.model import ExpertPredictor",
        "",
        'model = ExpertPredictor.from_pretrained("<this repo or directory>")',
        f"stream = model.stream(budget={meta.get('top_k') or 1})  # predictor/stream.py: feed token ids and routed experts",
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Push a predictor file or a trace set to the Hub, or save a predictor as a Hub-style directory."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m predictor.hub", description=main.__doc__)
    ap.add_argument("command", choices=["push-predictor", "push-traces", "save"])
    ap.add_argument("source", help="predictor file (.safetensors / .ckpt) or trace directory")
    ap.add_argument("target", help="Hub repo id owner/name (push-*) or a directory (save)")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help="save: replace the files it writes if they exist")
    args = ap.parse_args(argv)
    if args.command == "push-traces":
        from .hub_traces import push_trace_set

        print(push_trace_set(args.source, args.target, private=args.private or None))
        return 0
    from .export import load_predictor

    model = load_predictor(args.source)
    if args.command == "save":
        taken = [n for n in (WEIGHTS_NAME, CONFIG_NAME, "README.md") if (Path(args.target) / n).exists()]
        if taken and not args.overwrite:  # never replace a file we did not write without being asked
            ap.error(f"{args.target} already holds {', '.join(taken)}: pass --overwrite to replace them, or save elsewhere")
        model.save_pretrained(args.target)
        print(args.target)
    else:
        print(model.push_to_hub(args.target, private=args.private or None))
    return 0


def _check_config_json(config: Path) -> None:
    from .export import PredictorFileError

    try:
        value = json.loads(config.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise PredictorFileError(f"{config}: not valid JSON ({e}); save_pretrained writes it anew") from None
    if not isinstance(value, dict):
        raise PredictorFileError(f"{config}: a JSON {type(value).__name__}, not an object; save_pretrained writes it anew")


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
