"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
