"""Self-describing predictor files: a safetensors state dict with the config and trace meta as JSON.

The file's safetensors metadata (string -> string) holds

    format            "moe-prefetch-predictor"
    format_version    "2" ("1": written before the reuse hazard and calibration; both versions load)
    predictor_config  JSON of PredictorConfig
    meta              JSON: source model, L, E, k, vocab info, token space (predictor/token_space.py),
                      mode, lookahead, metrics, ... (free-form; training writes the DataModule's describe())

and, beside the weights, the learned eviction's reuse hazard fitted on the train split
(`reuse_hazard.rate` (L, G), `reuse_hazard.factor` (L, E); predictor.simulate.policy.ReuseHazard), which
the runtime's learned eviction reads (`model.reuse_hazard` after loading; None in files without it),
and the calibration of its probabilities when it was fitted (`calibration.raw`, `calibration.calibrated`,
predictor/calibration.py; `model.calibration`, else None).

No pickled classes: `load_predictor(path)` needs only torch and safetensors (no Hydra, no Lightning).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from predictor.atomic import atomic_path
from predictor.calibration import KEYS as CALIBRATION_KEYS
from predictor.calibration import Calibration
from predictor.config import PredictorConfigError
from predictor.jsonable import to_jsonable
from predictor.model import ExpertPredictor, PredictorConfig

FORMAT = "moe-prefetch-predictor"
FORMAT_VERSION = 2  # 2: may carry the reuse hazard and a calibration beside the weights
READ_VERSIONS = ("1", "2")


class PredictorFileError(ValueError):
    """A file that is not a (readable) predictor export; the message names the file and the problem."""


HAZARD_KEYS = ("reuse_hazard.rate", "reuse_hazard.factor")


def export_predictor(model: ExpertPredictor, path: str | Path, meta: dict | None = None, hazard=None,
                     calibration=None) -> Path:  # fmt: skip
    """Write `model` (weights + config), `meta`, the reuse hazard (`hazard`, else the model's
    `reuse_hazard` if it has one) and the calibration (`calibration`, else the model's if it has one)
    to `path` (.safetensors), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = getattr(model, "_orig_mod", model).config
    info = {
        "num_layers": c.num_layers,
        "num_experts": c.num_experts,
        "top_k": c.top_k,
        "vocab_size": c.vocab_size,
        "mode": c.mode,
        "lookahead": c.lookahead if c.mode == "layer_ahead" else None,
        "gate_inputs": c.gate_inputs,  # > 0: it also reads the cross-layer gate's picks (timing layer_output)
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    info.update(meta or {})
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "predictor_config": json.dumps(c.to_dict()),
        "meta": json.dumps(to_jsonable(info)),
    }
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: export the module it wraps
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    hazard = hazard if hazard is not None else getattr(model, "reuse_hazard", None)
    if hazard is not None:
        from predictor.simulate.policy import ReuseHazard

        hazard = ReuseHazard.of(hazard, c.num_layers, c.num_experts, c.top_k)  # checked against the model
        state.update(zip(HAZARD_KEYS, (torch.from_numpy(a.astype("float32")) for a in (hazard.rate, hazard.factor))))
    calibration = calibration if calibration is not None else getattr(model, "calibration", None)
    if calibration is not None:
        state.update(calibration.tensors())
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def predictor_file(path: str | Path) -> Path:
    """The predictor file `path` names: itself, or a folder's `predictor.safetensors` (a run directory,
    save_pretrained's); FileNotFoundError naming it otherwise."""
    path = Path(path)
    if path.is_dir() and (path / "predictor.safetensors").is_file():
        return path / "predictor.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no predictor file at {path}" + (" (a folder without predictor.safetensors)"
                                                                  if path.is_dir() else ""))
    return path


def read_predictor_meta(path: str | Path) -> tuple[PredictorConfig, dict]:
    """(config, meta) of a predictor file (or a folder holding one), without reading its tensors."""
    path = predictor_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        hint = "; a Lightning checkpoint: `python -m predictor.export CKPT OUT` exports it" if path.suffix == ".ckpt" else ""
        raise PredictorFileError(f"{path}: not a safetensors file ({e}){hint}") from e
    if md.get("format") != FORMAT:
        raise PredictorFileError(f"{path}: metadata 'format' is {md.get('format')!r}, expected {FORMAT!r}")
    if md.get("format_version") not in READ_VERSIONS:
        raise PredictorFileError(
            f"{path}: format_version {md.get('format_version')!r}, this code reads {' and '.join(READ_VERSIONS)}"
        )
    try:
        raw, meta = json.loads(md["predictor_config"]), json.loads(md.get("meta", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise PredictorFileError(f"{path}: bad predictor metadata ({e})") from e
    for key, value in (("predictor_config", raw), ("meta", meta)):
        if not isinstance(value, dict):
            raise PredictorFileError(f"{path}: metadata '{key}' must be a JSON object, got {type(value).__name__}")
    cfg = PredictorConfig.from_dict(raw)
    return cfg, meta


# state-dict names of files written before the redesign (heads and contributors were flat attributes)
LEGACY_RENAMES = (
    ("prev_skip.", "contributors.skip.prev."),
    ("cur_skip.", "contributors.skip.cur."),
    ("memory.", "contributors.memory."),
    ("bank.", "contributors.bank."),
    ("head.weight", "head.out.weight"),
    ("head.bias", "head.out.bias"),
    ("ctx_proj.", "head.ctx_proj."),
    ("layer_emb", "head.layer_emb"),
    ("cur_emb.", "head.cur_emb."),
    ("last_emb.", "head.last_emb."),
    ("depth_blocks.", "head.blocks."),
    ("depth_ln.", "head.ln."),
    ("head_w", "head.w"),
    ("head_b", "head.b"),
)


def _current_names(state: dict, known: set) -> dict:
    """Strip torch.compile's `_orig_mod.` and map pre-redesign names onto today's."""
    out = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        if key not in known:
            for old, new in LEGACY_RENAMES:
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        out[key] = value
    return out


def _from_checkpoint(path: Path) -> tuple[PredictorConfig, dict, dict]:
    from predictor.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)  # weights_only: a crafted .ckpt must not run code
    net = (ckpt.get("hyper_parameters") or {}).get("net")
    if net is None:
        raise PredictorFileError(f"{path}: no hyper_parameters.net; not a PredictorLitModule checkpoint")
    state = {k[len("net.") :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("net.")}
    meta = ckpt.get("predictor_meta")  # the trace meta PredictorLitModule stores (token space included)
    return PredictorConfig.from_dict(dict(net)), state, {**(meta if isinstance(meta, dict) else {}), "checkpoint": str(path)}


def load_predictor(path: str | Path, map_location: str | torch.device = "cpu", with_meta: bool = False):
    """The one predictor loader: an exported `.safetensors` file or a Lightning `.ckpt` of
    PredictorLitModule -> ExpertPredictor in eval mode (or (model, meta) with with_meta=True).

    Files from before the predictor redesign load too (their state-dict names are mapped), as do
    checkpoints of a `compile: true` run (`_orig_mod.` is stripped)."""
    from safetensors.torch import load_file

    path = predictor_file(path)
    try:
        if path.suffix == ".ckpt":
            cfg, state, meta = _from_checkpoint(path)
        else:
            cfg, meta = read_predictor_meta(path)
            state = load_file(str(path), device="cpu")
    except PredictorConfigError as e:  # e.g. a lookahead >= its number of MoE layers: name the file
        raise PredictorFileError(f"{path}: {e}") from None
    model = ExpertPredictor(cfg)
    try:
        hazard = _pop_pair(state, HAZARD_KEYS, "a reuse hazard")
        if hazard is not None:
            from predictor.simulate.policy import ReuseHazard

            hazard = ReuseHazard.of(ReuseHazard(*hazard), cfg.num_layers, cfg.num_experts, cfg.top_k)
        calibration = _pop_pair(state, CALIBRATION_KEYS, "a calibration")
        calibration = Calibration(*calibration) if calibration is not None else None
    except ValueError as e:
        raise PredictorFileError(f"{path}: {e}") from None
    state = _current_names(state, set(model.state_dict()))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape for the config (the routing bank's resize itself)
        raise PredictorFileError(f"{path}: tensors that do not fit its config: {' '.join(str(e).split())[:600]}") from None
    if missing or unexpected:
        raise PredictorFileError(
            f"{path}: state dict mismatch: missing {missing}, unexpected {unexpected}; re-export it with "
            "`python -m predictor.export <checkpoint.ckpt> <out.safetensors>` from its training checkpoint"
        )
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise PredictorFileError(f"{path}: non-finite weights in {bad[:5]}")
    model.to(map_location).eval()
    model.predictor_meta = meta  # what it was trained on (token space ...): the runtime checks it
    model.reuse_hazard = hazard  # the learned eviction's, or None
    model.calibration = calibration  # the map from its sigmoid to calibrated probabilities, or None
    return (model, meta) if with_meta else model


def _pop_pair(state: dict, keys: tuple[str, str], what: str) -> tuple | None:
    """Two tensors stored beside the weights (removed from `state`) as float64 arrays, or None when the
    file has neither; one without the other is refused by name."""
    found = [k in state for k in keys]
    if not any(found):
        return None
    if not all(found):
        raise ValueError(f"{what} needs both {keys}, found only {[k for k in keys if k in state]}")
    return tuple(state.pop(k).double().numpy() for k in keys)


def fit_reuse_hazard(meta: dict, traces: str | Path | None = None):
    """The reuse hazard of a predictor's train split: its traces (`traces`, else the path its meta
    records), split as its meta says (`splits.recorded_splits`)."""
    from predictor.evaluation_rows import train_replay_stats
    from predictor.splits import recorded_splits, trace_fingerprint
    from predictor.traces import load_traces

    where = traces or meta.get("traces")
    if not where:
        raise ValueError("the predictor's meta records no traces path: give the traces it was trained on")
    if isinstance(where, list):
        raise ValueError(f"the predictor was trained on several trace sets {where}: fit its hazard with "
                         "`predictor.simulate.policy.reuse_hazard` on their train rows")  # fmt: skip
    ts = load_traces(where)
    want, have = (meta.get("num_layers"), meta.get("num_experts")), (ts.meta.num_moe_layers, ts.meta.num_experts)
    if None not in want and have != want:
        raise ValueError(f"traces {ts.path} have L, E = {have}; the predictor's were {want}")
    mine = meta.get("traces_fingerprint")
    if mine is not None and trace_fingerprint(ts) != mine:  # its split of other rows: not its train prompts
        raise ValueError(f"traces {ts.path} are not the set the predictor was trained on ({meta.get('traces')}, "
                         f"fingerprint {mine}): its hazard is fitted on its own train prompts")
    split, train = recorded_splits(ts.prompt_ids, meta)
    return train_replay_stats(ts.select(split[train]))[1]


def main(argv: list[str] | None = None) -> int:
    """`python -m predictor.export IN OUT`: export a training checkpoint (or re-write a predictor file)
    as a predictor file; `--hazard-traces DIR` adds the reuse hazard of its train split (the learned
    eviction's) to a file made without one."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m predictor.export", description=main.__doc__)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--hazard-traces", default=None, metavar="DIR",
                    help="fit the reuse hazard on the train split of these traces ('meta': the path the file records)")
    ap.add_argument("--drop-calibration", action="store_true",
                    help="write the weights without their calibration (to measure what it is worth)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT file (never IN itself)")
    args = ap.parse_args(argv)
    if args.out.is_dir():
        ap.error(f"OUT {args.out} is a directory: give the file to write, e.g. {args.out / 'predictor.safetensors'}")
    if args.out.exists() and args.ckpt.exists() and args.out.resolve() in (args.ckpt.resolve(),
                                                                           args.ckpt.resolve() / "predictor.safetensors"):
        ap.error(f"OUT {args.out} is IN itself: write the export elsewhere")
    if args.out.exists() and not args.overwrite:
        ap.error(f"OUT {args.out} exists: pass --overwrite to replace it")
    model, meta = load_predictor(args.ckpt, with_meta=True)
    hazard = None
    if args.hazard_traces:
        hazard = fit_reuse_hazard(meta, None if args.hazard_traces == "meta" else args.hazard_traces)
    if args.drop_calibration:
        model.calibration = None
    elif meta.get("calib_fraction") and getattr(model, "calibration", None) is None:
        print(f"warning: {args.ckpt} was trained with calib_fraction {meta['calib_fraction']} but carries no "
              "calibration (a training checkpoint does not: the run's predictor.safetensors has it)", file=sys.stderr)
    print(export_predictor(model, args.out, meta, hazard))
    return 0


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
