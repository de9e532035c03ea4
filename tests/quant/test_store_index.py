"""The store index's own checks (`quant.store_index.parse_index`), on the loaded JSON alone."""

from __future__ import annotations

import copy
import json

import pytest

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout
from d2moe.quant.store import StoreReader
from d2moe.quant.store_index import ALIGN_BYTES, index_digest, parse_index
from tests.quant.test_store import SPEC, _write


def test_parse_index_holds_what_the_reader_serves_and_checks_the_digest_first(tmp_path):
    layout = QuantLayout(kind="bitplane", b1=2, bK=5, group=32)
    _write(tmp_path / "s", layout)
    raw = json.loads((tmp_path / "s" / "index.json").read_text())
    ix = parse_index(copy.deepcopy(raw), "index.json")  # no file touched: a dict in
    assert (ix.spec, ix.layout, ix.bits_stored) == (SPEC, layout, 5)
    assert ix.shapes == dict(zip(("w1", "w3", "w2"), SPEC.expert_shapes, strict=True))
    assert len(ix.entries) == SPEC.layers * SPEC.experts * 3 * 4  # levels 2..5
    with StoreReader(tmp_path / "s") as reader:  # and what it holds is what a reader serves
        assert reader.expert_nbytes(1, 2, 0, 5) == sum(
            e.nbytes for (lay, ex, _, _), e in ix.entries.items() if (lay, ex) == (1, 2))
    assert all(e.offset % ALIGN_BYTES == 0 for e in ix.entries.values() if e.tensor == "w1")
    edited = copy.deepcopy(raw)
    edited["bits_stored"] = 9  # out of range, but the digest no longer matches: that first
    with pytest.raises(UserError) as err:
        parse_index(edited, "index.json")
    assert err.value.field == "sha256"
    edited["sha256"] = index_digest(edited)  # re-signed: the structure check names it
    with pytest.raises(UserError) as err:
        parse_index(edited, "index.json")
    assert err.value.field == "bits_stored" and err.value.path == "index.json"
