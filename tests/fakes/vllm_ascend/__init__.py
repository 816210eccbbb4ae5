"""Fake of vllm-project/vllm-ascend v0.11.0-dev (1b16c01) for CPU tests: module paths, classes and signatures
follow that commit; the NPU kernels are replaced by plain torch with the same row-wise semantics."""
