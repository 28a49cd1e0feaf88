"""Helpers of the SGLang tests: real HiCache host pools built on the CPU."""
