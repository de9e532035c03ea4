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
    with StoreReader(tmp_path / "s") as reader:
        assert (ix.spec, ix.layout, ix.bits_stored) == (reader.spec, reader.layout, 5)
        assert ix.entries == reader.entries and ix.shapes == reader.shapes
    assert ix.spec == SPEC and len(ix.entries) == SPEC.layers * SPEC.experts * 3 * 4
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
