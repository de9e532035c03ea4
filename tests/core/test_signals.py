"""SIGTERM raised as `Terminated` inside `sigterm_raises`, so cleanup code runs."""

from __future__ import annotations

import os
import signal

import pytest

from d2moe.core.signals import Terminated, sigterm_raises


def test_sigterm_raises_inside_the_block_runs_finally_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(Terminated), sigterm_raises():
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the default handler would end pytest here
            for _ in range(10**6):  # the handler runs between bytecodes, almost at once
                pass
        finally:
            cleaned.append(True)
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Terminated, KeyboardInterrupt)  # code that lets Ctrl-C through
