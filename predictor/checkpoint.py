"""Load a Lightning checkpoint (.ckpt) without running code from it.

A .ckpt is a pickle, and unpickling it without restrictions runs whatever a crafted file asks for.
Every load of a user-given checkpoint goes through `load_checkpoint`: `weights_only=True` admits
tensors, plain containers and numbers only. That is all our checkpoints hold (PredictorLitModule
stores its hyper-parameters as plain dicts; tests/test_checkpoint.py checks a trained run's files
with `torch.serialization.get_unsafe_globals_in_checkpoint`), so no class is allow-listed.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that is not ours to load; the message names the file and why."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict at `path`, loaded with `weights_only=True`; CheckpointError if refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as f:  # torch.load reads a safetensors file too, as a plain dict: say what it is
        head = f.read(16)
    if len(head) == 16 and int.from_bytes(head[:8], "little") < 1 << 30 and head[8:9] == b"{":
        raise CheckpointError(f"{path}: a safetensors file (an exported predictor), not a training checkpoint: "
                              "resuming and train=false need a Lightning .ckpt (<run>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        what = f"it references {found.group(1)}" if found else detail.group(1) if detail else "see below"
        raise CheckpointError(
            f"{path}: refused to load: not a plain checkpoint of tensors and data ({what}); "
            "unpickling it could run code. Load only checkpoints written by this project's training"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:  # truncated (a zip cut short: OSError) or not a torch file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: a checkpoint must hold a dict, got {type(ckpt).__name__}")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: no state_dict: not a Lightning training checkpoint")
    return ckpt
