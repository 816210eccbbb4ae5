"""Fake of Ascend/MindSpeed-RL (2.3.0 and master 05a90d77) for CPU tests."""
