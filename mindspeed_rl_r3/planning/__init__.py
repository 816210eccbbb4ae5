"""The pieces of ``mindspeed-rl-r3 plan``: the config as the plan reads it (:mod:`.sections`), the parallel layout
computed once (:mod:`.layout`), the plan's own rules (:mod:`.rules`; the run's rules are
:mod:`mindspeed_rl_r3.config_rules`), the memory estimate (:mod:`.memory`), the report (:mod:`.report`) and hydra
composition (:mod:`.compose`). :mod:`mindspeed_rl_r3.plan` puts them together. Torch-free."""
