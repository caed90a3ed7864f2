"""One conversion of results to JSON-ready Python values (metrics reports, export metadata, model cards)."""

from __future__ import annotations

import math


def to_jsonable(obj):
    """Tensors, numpy arrays and scalars -> Python numbers and lists, recursively; NaN -> None (an
    empty bucket in a per-position curve, say), so every value is valid JSON."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
