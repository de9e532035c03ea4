"""Nested-bit-width expert weights: MWQ and bitplane quantizers, the on-disk store, RTN baselines.

Numpy only at import. `reference` (torch dequantization) and `cmd` (the `quantize` verb)
import torch inside their functions.
"""

from d2moe.quant.nested import NESTED_KINDS, NestedMatrix, quantize_matrix

__all__ = ["NESTED_KINDS", "NestedMatrix", "quantize_matrix"]
