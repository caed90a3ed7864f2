"""Offloading runtime: host expert store, device slot pool, copy streams, prefetch drivers, counters."""

from integrate.runtime.counters import Counters
from integrate.runtime.runtime import Runtime, install, resolve_capacity

__all__ = ["Counters", "Runtime", "install", "resolve_capacity"]
