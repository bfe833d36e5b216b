"""The results files evaluate writes (``metrics/eval/seed<s>/<model>.json``) as the report
and users read them: key spellings and strict JSON. The report reads these files, never the
evaluate stage's code."""
from __future__ import annotations

import math


def radius_key(radius: float) -> str:
    """A radius on the 0..255 scale as a JSON key and in metric names: 8.0 -> "8", 0.25 -> "0.25"."""
    return f"{radius:g}"


def json_clean(obj):
    """NaN and infinities -> None, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
