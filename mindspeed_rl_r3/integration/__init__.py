"""MindSpeed-RL integration, the parts without upstream imports: how the package's config sections travel to every
process, which TransferDock columns carry routing and rollout log-probs, how they are built at rollout and read at
training, and how the step metrics are reduced. The adapters that attach them to MindSpeed-RL are the
``patches/mindspeed_rl_*`` modules."""
