"""LevelFormat.convert checks each stored level's length against the layout before it
reshapes anything: a wrong length is a UserError naming the level, not a ValueError from a
reshape on an I/O lane."""

from __future__ import annotations

import numpy as np
import pytest

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec
from d2moe.executor.levels import LevelFormat
from d2moe.quant.nested import encode_level, quantize_matrix
from d2moe.quant.store import tensor_shapes

SPEC = ModelSpec(name="small", layers=1, experts=1, top_k=1, hidden=64, ffn=96, heads=1,
                 kv_heads=1, vocab=16)


@pytest.fixture(params=["mwq", "bitplane"])
def stored(request):
    """(layout, {bits: {tensor: uint8 bytes}}) of one expert, levels b1..bK."""
    layout = QuantLayout(kind=request.param, b1=2, bK=4, group=32)
    rng = np.random.default_rng(0)
    mats = {t: quantize_matrix(rng.standard_normal(s).astype(np.float32), layout)
            for t, s in tensor_shapes(SPEC).items()}
    return layout, {b: {t: np.frombuffer(encode_level(m, b), np.uint8) for t, m in mats.items()}
                    for b in range(layout.b1, layout.bK + 1)}


@pytest.mark.parametrize("row_major", [True, False])
def test_a_level_of_the_right_length_converts(stored, row_major):
    layout, levels = stored
    fmt = LevelFormat(SPEC, layout, row_major=row_major)
    for bits, level in levels.items():
        assert fmt.convert(bits, level).size == fmt.nbytes(bits) == fmt.store_nbytes(bits)


@pytest.mark.parametrize("cut", [1, 512])
def test_a_level_of_the_wrong_length_names_the_level(stored, cut):
    layout, levels = stored
    fmt = LevelFormat(SPEC, layout, row_major=True)
    short = dict(levels[3], w3=levels[3]["w3"][:-cut])
    with pytest.raises(UserError, match=r"field 'level 3': stored level 3 of tensor w3 "
                                        r"\(96x64\) has \d+ bytes, the store's layout "
                                        r"\((mwq|bitplane), b1 2, group 32\) needs \d+ "
                                        r"\(fix: the store is damaged"):
        fmt.convert(3, short)
    # the base read under another group size (an edited index.json: once a reshape error)
    other = LevelFormat(SPEC, QuantLayout(kind=layout.kind, b1=2, bK=4, group=64))
    with pytest.raises(UserError, match="stored level 2 of tensor w1"):
        other.convert(2, levels[2])
    with pytest.raises(UserError, match="stored level 4 of tensor w2 .* has 0 bytes"):
        fmt.convert(4, {t: a for t, a in levels[4].items() if t != "w2"})


def test_a_row_major_level_of_whole_words_is_its_stored_bytes(stored, monkeypatch):
    """The copy-through path (`stored_is_pool`) writes what the part-by-part path writes."""
    layout, levels = stored
    fmt = LevelFormat(SPEC, layout, row_major=True)
    assert fmt.stored_is_pool  # 64 and 96 columns: whole words
    assert not LevelFormat(SPEC, layout).stored_is_pool  # word-major: transposed parts
    for bits, level in levels.items():
        fast = fmt.convert(bits, level)
        monkeypatch.setattr(fmt, "stored_is_pool", False)
        assert np.array_equal(fast, fmt.convert(bits, level)), bits
        monkeypatch.setattr(fmt, "stored_is_pool", True)
    odd = ModelSpec(name="odd", layers=1, experts=1, top_k=1, hidden=64, ffn=40, heads=1,
                    kv_heads=1, vocab=16)  # w2 has 40 columns: a partial word per row
    assert not LevelFormat(odd, layout, row_major=True).stored_is_pool
