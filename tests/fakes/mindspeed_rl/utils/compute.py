"""Fake ``mindspeed_rl/utils/compute.py``: the process-global Megatron parallel state the engine reads."""

_ParallelState = None


def set_parallel_state(obj):
    global _ParallelState
    _ParallelState = obj


def get_parallel_state():
    return _ParallelState
