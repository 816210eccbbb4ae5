"""Fake ``mindspeed_rl/config_cls/base_config.py::BaseConfig``: ``update`` raises for a key the class lacks."""


class BaseConfig:
    def update(self, config_dict, model_config_dict=None):
        for key, value in (config_dict or {}).items():
            key = key.replace("-", "_")
            if not hasattr(self, key):
                raise ValueError(f"The key: {key} is missing, causing the setup to fail. Please check.")
            setattr(self, key, value)

    def dict(self):
        return self.__dict__
