"""Argument types the command lines share."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse `type=` for a count that must be >= 1 (threads, layers, experts): the error names the value."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n
