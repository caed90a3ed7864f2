"""Random trace sets for tests: uniform routing, written with the real trace writer."""

import io
import tarfile
from pathlib import Path

import numpy as np

from predictor.traces import TraceMeta, TraceRecord, TraceSet, write_traces


def random_traces(
    path,
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    vocab_size: int,
    n_prompts: int = 10,
    rows_per_prompt: int = 1,
    lengths: tuple[int, int] = (2, 30),  # [low, high) tokens per row
    seed: int = 0,
    **meta_fields,
) -> TraceSet:
    rng = np.random.default_rng(seed)
    meta_fields = {"source_model": "synthetic", "architecture": "synthetic", **meta_fields}
    meta = TraceMeta(
        num_layers=num_layers,
        moe_layers=list(range(num_layers)),
        num_experts=num_experts,
        top_k=top_k,
        vocab_size=vocab_size,
        **meta_fields,
    )
    recs = []
    for p in range(n_prompts):
        for _ in range(rows_per_prompt):
            n = int(rng.integers(*lengths))
            order = np.argsort(rng.random((n, num_layers, num_experts)), axis=-1)
            experts = order[..., :top_k]
            recs.append(TraceRecord(prompt_id=p, token_ids=rng.integers(0, vocab_size, n), experts=experts, num_prefill=n))
            if meta.gate_ahead:  # a gate that knows the first routed expert, and guesses the rest
                recs[-1].gate_ahead = np.concatenate([order[..., :1], order[..., top_k:][..., : meta.gate_ahead - 1]], -1)
    return write_traces(path, meta, recs)


def tiny_predictor(*, vocab_size: int = 40, num_layers: int = 3, num_experts: int = 8, top_k: int = 2,
                   mode: str = "layer_ahead", lookahead: int = 1, seed: int = 0, **overrides):
    """A tiny ExpertPredictor in eval mode (d_model 16, one block of each kind).

    With `bank_size` in the overrides its routing bank holds 3 random rows for each token id < vocab_size
    - 2 (so two ids have none), capped at bank_size per token."""
    import numpy as np
    import torch

    from predictor.bank import build_bank
    from predictor.model import ExpertPredictor, PredictorConfig

    torch.manual_seed(seed)
    sizes = dict(d_model=16, n_heads=2, n_blocks=1, depth_blocks=1, depth_heads=2)
    bank = None
    if overrides.get("bank_size"):
        rng = np.random.default_rng(seed)
        tokens = np.repeat(np.arange(vocab_size - 2), 3)
        experts = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(len(tokens) * num_layers)])
        bank = build_bank(tokens, experts.reshape(len(tokens), num_layers, top_k), np.zeros(len(tokens)),
                          vocab_size, overrides["bank_size"])
    cfg = PredictorConfig(vocab_size=vocab_size, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                          mode=mode, lookahead=lookahead, **{**sizes, **overrides})
    model = ExpertPredictor(cfg).eval()
    with torch.no_grad():  # gains start at zero (silent); tests need a memory and a bank that speak
        for part in (model.memory, model.bank):
            if part is not None:
                part.gain_lin.fill_(1.0)
                part.gain_log.fill_(0.5)
    if bank is not None:
        model.bank.fill(*bank)
    return model


# Hydra overrides for a tiny, fast training run on random_traces (shared by the training tests)
TINY_NET = [
    "model.net.d_model=16",
    "model.net.n_heads=2",
    "model.net.n_blocks=1",
    "++model.net.depth_blocks=1",  # depth keys: conf/model/layer_ahead.yaml has them, token_ahead not
    "++model.net.d_depth=16",
    "++model.net.depth_heads=2",
    "data.window=16",
    "data.context=4",
    "data.batch_tokens=64",
]


def train_cfg(overrides: list[str], out):
    """conf/train.yaml composed with `overrides`, its output directory set to `out` (no Hydra run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        del cfg["hydra"]
    return cfg


def write_tar(path: Path, members: dict[str, str]) -> Path:
    """An .xz tarball of text files (name -> content), as MoE-Beyond ships its traces."""
    with tarfile.open(path, "w:xz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
