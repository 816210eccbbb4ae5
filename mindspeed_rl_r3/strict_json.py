"""JSON that every parser accepts: non-finite floats (NaN, +-inf, which Python's json writes as bare ``NaN`` /
``Infinity``) become ``null``. Used for every JSON file and ``--json`` output the package writes."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (in nested dicts, lists and tuples) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite` ``(value)``; refuses anything that would still not be strict JSON."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
