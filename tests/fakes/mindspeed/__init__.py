"""Fake of Ascend/MindSpeed (branch 2.3.0_core_r0.12.1, ac9f0e74) for CPU tests."""
