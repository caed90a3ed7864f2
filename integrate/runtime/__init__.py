"""Offloading runtime: host expert store, device slot pool, copy streams, prefetch drivers, counters.

`Runtime`, `install` and `resolve_capacity` load on first use (PEP 562), so the cache, store and drivers
import without `transformers` (the trace replay benchmark runs no model)."""

from integrate.runtime.counters import Counters

__all__ = ["Counters", "Runtime", "install", "resolve_capacity"]


def __getattr__(name: str):
    if name in ("Runtime", "install", "resolve_capacity"):
        from integrate.runtime import capacity, installer, runtime

        return getattr({"Runtime": runtime, "install": installer, "resolve_capacity": capacity}[name], name)
    raise AttributeError(f"module 'integrate.runtime' has no attribute {name!r}")
