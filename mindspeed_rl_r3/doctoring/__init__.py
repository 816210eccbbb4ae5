"""The parts of ``mindspeed-rl-r3 doctor`` (entry: :mod:`mindspeed_rl_r3.doctor`): installed versions
(:mod:`.versions`), upstream source read without import (:mod:`.source_index`) and the printed report
(:mod:`.report`)."""
