"""Argument types the command lines share."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def positive_int(text: str) -> int:
    """argparse `type=` for a count that must be >= 1 (threads, layers, experts): the error names the value."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def nonnegative_int(text: str) -> int:
    """argparse `type=` for a count that may be 0 (tokens to generate, warm-up steps)."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


# a missing or unreadable file, a bad value or a missing key: the project's errors name the file, row,
# key or shape, so the message is the whole story (TraceFormatError, CheckpointError, ... subclass these)
USER_ERRORS = (OSError, ValueError, KeyError)


def check_model_ref(ref: str, key: str = "model") -> None:
    """A model reference that looks like a local path must exist (transformers would call it a bad repo id)."""
    if Path(ref).expanduser().exists():
        return
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref or ref.endswith("/"):
        raise FileNotFoundError(
            f"{key}={ref}: no such directory (a local model path; a hub name has the form 'org/name')"
        )


def resolve_device(name: str, key: str = "device") -> torch.device:  # noqa: F821  (torch imported in the call)
    """`name` ("auto": cuda when there is one) as a device this machine has; else a ValueError naming `key`."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:  # "Expected one of cpu, cuda, ... device type at start of device string"
        raise ValueError(f"{key}={name}: not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name} requested but torch sees no CUDA device")
    return device


def run(main: Callable[[], int | None]) -> NoReturn:
    """Run a command line's `main()` and exit with its code. A user error prints `<command>: error:
    <message>` alone and exits 2, as argparse does for a bad argument; MOE_PREFETCH_TRACEBACK=1 shows the
    traceback as well. Any other exception propagates with its traceback (a bug, not bad input)."""
    try:
        code = main()
    except USER_ERRORS as e:
        if os.environ.get("MOE_PREFETCH_TRACEBACK", "") not in ("", "0"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e  # (KeyError's str() quotes)
        spec = getattr(sys.modules["__main__"], "__spec__", None)  # `python -m predictor.export`: its module name
        prog = spec.name.removesuffix(".__main__") if spec is not None else Path(sys.argv[0]).name
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)
