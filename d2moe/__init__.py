"""d2moe: nested-bit-width MoE serving and the scheduling policies that drive it.

Importing the package has no side effects: no files are written, no GPU memory is taken.
"""

__version__ = "0.1.0"
