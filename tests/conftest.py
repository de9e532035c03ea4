"""Fixtures shared across test packages."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_store_path(tmp_path_factory):
    """The tiny model's nested store in the default layout (bitplane 2..8), quantized once
    per session; tests that damage a store copy it first."""
    pytest.importorskip("torch")
    from d2moe.core.sizes import QuantLayout
    from d2moe.model.load import tiny_dir
    from d2moe.quant.cmd import quantize_checkpoint

    path = tmp_path_factory.mktemp("store") / "tiny"
    quantize_checkpoint(tiny_dir(), path, QuantLayout(), progress=False)
    return path
