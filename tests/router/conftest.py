"""One small nested store of the tiny model (bitplane, 2..4 bits) shared by the router tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A 2..4-bit bitplane store of the tiny model (5+ bits are not served)."""
    pytest.importorskip("torch")
    from d2moe.core.sizes import QuantLayout
    from d2moe.model.load import tiny_dir
    from d2moe.quant.cmd import quantize_checkpoint

    path = tmp_path_factory.mktemp("router-store") / "tiny"
    quantize_checkpoint(tiny_dir(), path, QuantLayout(b1=2, bK=4), progress=False)
    return path


@pytest.fixture(scope="session")
def widths(store):
    """Every expert of the store dequantized at 2, 3 and 4 bits."""
    from d2moe.quant.store import StoreReader
    from d2moe.router.experts import WidthWeights

    with StoreReader(store) as reader:
        return WidthWeights.from_store(reader, (2, 3, 4))
