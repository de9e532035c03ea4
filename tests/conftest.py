"""Fixtures shared across test packages."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Built-in artefacts (the tiny model's store, profile scratch) go to a directory of the
    test session's, never the user's ~/.cache/d2moe (D2MOE_CACHE, executor.setup.cache_dir)."""
    old = os.environ.get("D2MOE_CACHE")
    os.environ["D2MOE_CACHE"] = str(tmp_path_factory.mktemp("d2moe-cache"))
    yield
    if old is None:
        os.environ.pop("D2MOE_CACHE", None)
    else:
        os.environ["D2MOE_CACHE"] = old


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


class CountingBar:
    """A progress bar (d2moe.core.progress) that records what it was told: updates, closing."""

    def __init__(self) -> None:
        self.n, self.closed, self.desc = 0, False, ""

    def update(self, n: int) -> None:
        self.n += n

    def set_description(self, text: str) -> None:
        self.desc = text

    def close(self) -> None:
        self.closed = True
