import json
import math

import pytest

from mindspeed_rl_r3 import strict_json


def test_non_finite_floats_become_null_everywhere():
    value = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": float("nan"), "e": "NaN"}, "f": 3}
    text = strict_json.dumps(value)
    assert json.loads(text) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": None, "e": "NaN"}, "f": 3}
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text


def test_what_json_cannot_hold_is_refused():
    with pytest.raises(TypeError):
        strict_json.dumps({"x": object()})
