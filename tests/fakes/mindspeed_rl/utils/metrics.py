"""Fake ``mindspeed_rl/utils/metrics.py::Metric``: ``update`` with ``cumulate`` extends lists per key."""


class Metric:
    def __init__(self):
        self.metric = {}

    def update(self, key="", value=None, cumulate=False):
        if isinstance(value, dict):
            if not cumulate:
                self.metric.update(value)
                return
            for k, v in value.items():
                if isinstance(self.metric.get(k), list):
                    self.metric[k].extend(v)
                else:
                    self.metric[k] = [*v]
        elif cumulate:
            if isinstance(self.metric.get(key), list):
                self.metric[key].extend(value)
            else:
                self.metric[key] = [*value]
        else:
            self.metric[key] = value

    def reset(self):
        self.metric = {}
