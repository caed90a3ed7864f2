"""Trace sets on the Hugging Face Hub: a dataset repo holding the trace directory's files as they are
(Arrow shards written by `save_to_disk`, trace_meta.json, vocab.json for imports) plus a dataset card
whose metadata carries the trace meta (`trace_meta`) and points the Hub's viewer at the shards.

    push_trace_set("data/demo/traces", "owner/name")   # -> "hf://datasets/owner/name"
    load_traces("hf://datasets/owner/name[@revision]") # downloaded once into the HF cache, memory-mapped;
                                                       # offline (HF_HUB_OFFLINE=1) read from that cache

Nothing here imports Hydra, Lightning or (until called) huggingface_hub.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .trace_store import META_FILE

DATASET_PREFIX = "hf://datasets/"
_URI = re.compile(r"hf:/+datasets/([\w.-]+/[\w.-]+)(?:@([\w./-]+))?/?")  # hf:/ too: Path() folds the //


def is_hub_uri(path) -> bool:
    return str(path).startswith("hf:/")


def parse_hub_uri(uri: str) -> tuple[str, str | None]:
    """"hf://datasets/owner/name[@revision]" -> (repo_id, revision)."""
    m = _URI.fullmatch(str(uri))
    if not m:
        raise ValueError(f"{uri!r}: a trace set on the Hub is named hf://datasets/<owner>/<name>[@<revision>]")
    return m.group(1), m.group(2)


def resolve_trace_path(path) -> Path:
    """A local trace directory as given; an `hf://datasets/...` name downloaded into the HF cache (once;
    offline, read from the cache) -> the local snapshot directory."""
    if not is_hub_uri(path):
        return Path(path)
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_hub_uri(path)
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision))
    except Exception as e:  # noqa: BLE001 - offline / missing repo / network: say which name failed
        raise FileNotFoundError(f"{path}: cannot get the trace set from the Hub or the HF cache ({e})") from e


def trace_set_card(meta, repo_id: str):
    """A DatasetCard whose metadata carries the trace meta (`trace_meta`) and points the Hub at the shards."""
    from huggingface_hub import DatasetCard, DatasetCardData

    m = meta
    data = DatasetCardData(
        tags=["moe-prefetch", "expert-routing-traces", "mixture-of-experts"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data-*.arrow"}]}],
        trace_meta=m.to_dict(),
    )
    vocab = f"`{m.tokenizer}` token ids" if m.tokenizer else (f"ids of `{m.vocab_file}`" if m.vocab_file else "token ids")
    body = [
        f"# Expert-routing traces of {m.source_model}",
        "",
        f"Which routed experts `{m.source_model}` ({m.architecture}) used for every token: {m.num_sequences:,} "
        f"sequences, {m.num_tokens:,} tokens, {m.num_moe_layers} MoE layers x {m.top_k} of {m.num_experts} experts; "
        f"{vocab}; prompts: {m.prompt_source or 'not recorded'}. Written by moe-prefetch; the "
        "`trace_meta` metadata above is `trace_meta.json`.",
        "",
        "```python",
        "from predictor.traces import load_traces",
        "",
        f'traces = load_traces("{DATASET_PREFIX}{repo_id}")',
        "```",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


TRACE_SET_FILES = ["data-*.arrow", "state.json", "dataset_info.json", META_FILE, "vocab.json"]  # what a push writes


def push_trace_set(path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                   revision: str | None = None, commit_message: str | None = None) -> str:  # fmt: skip
    """Upload the trace set at `path` (checked by `load_traces`) to the dataset repo `repo_id` in one commit:
    its shards, trace_meta.json (and vocab.json), and a dataset card; remote files of a trace set it no
    longer has (`TRACE_SET_FILES`: an older push's extra shards) are deleted, any other file is kept.
    Returns the name `load_traces` takes: "hf://datasets/<repo_id>"."""
    from huggingface_hub import HfApi

    from .traces import load_traces

    ts = load_traces(path)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for f in sorted(ts.path.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name != "README.md":
                os.symlink(f.resolve(), stage / f.name)  # uploads read through the link: no copy of big shards
        (stage / "README.md").write_text(str(trace_set_card(ts.meta, repo_id)))
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=stage, revision=revision,
                          delete_patterns=TRACE_SET_FILES, commit_message=commit_message or f"Trace set {ts.meta.source_model}")  # fmt: skip
    return f"{DATASET_PREFIX}{repo_id}"
