"""Fake of Ascend/MindSpeed-LLM (branch 2.3.0, a2c0733) for CPU tests."""
