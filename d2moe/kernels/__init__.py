"""Fused dequantization + matrix product over nested planes: Triton on CUDA, torch on CPU.

Importing this package imports neither torch nor triton: use `d2moe.kernels.dispatch`.
"""

__all__ = ["dispatch", "packed"]
