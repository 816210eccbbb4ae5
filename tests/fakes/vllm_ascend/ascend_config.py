"""Fake ``vllm_ascend.ascend_config``: ``get_ascend_config().torchair_graph_config.enabled``."""

from types import SimpleNamespace

_config = SimpleNamespace(torchair_graph_config=SimpleNamespace(enabled=False))


def get_ascend_config():
    return _config
