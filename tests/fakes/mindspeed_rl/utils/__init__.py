"""Fake ``mindspeed_rl/utils`` (05a90d77): only the submodules the integration touches."""
