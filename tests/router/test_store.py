"""router.json's own digest: an edited field is refused, a record from before the digest is
still read (its fields checked, naming the file), a binary record is a UserError, and a save
interrupted between the gate and the record is refused as a damaged pair."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from d2moe.core.errors import UserError  # noqa: E402
from d2moe.model.load import load_tiny  # noqa: E402
from d2moe.router import store as router_store  # noqa: E402
from d2moe.router.gate import BitGate  # noqa: E402
from d2moe.router.store import load_router, record_digest, save_router  # noqa: E402


@pytest.fixture(scope="module")
def spec():
    return load_tiny()[1]


def _meta(spec, **over):
    return {"bits": [2, 3, 4], "capacities": [0.3, 0.4, 0.3], "alpha": 0.0, "window": 8,
            "layers": spec.layers, "hidden": spec.hidden, **over}


def _save(path, spec, seed=0, **over):
    return save_router(path, BitGate(spec.layers, spec.hidden, 3, seed=seed), _meta(spec, **over))


def _edit(path, *, resign: bool | None, **fields) -> None:
    """Set `fields` in router.json; resign: recompute the digest, None: drop it (an old
    record), False: keep the stale one."""
    meta = json.loads((path / "router.json").read_text())
    meta.update(fields)
    if resign is None:
        meta.pop("record_sha256", None)
    elif resign:
        meta["record_sha256"] = record_digest(meta)
    (path / "router.json").write_text(json.dumps(meta))


def test_the_record_digest_covers_every_field(tmp_path, spec):
    path = _save(tmp_path / "r", spec)
    meta = json.loads((path / "router.json").read_text())
    assert meta["record_sha256"] == record_digest(meta) and len(meta["record_sha256"]) == 64
    assert load_router(path, spec=spec).capacities == (0.3, 0.4, 0.3)
    _edit(path, resign=False, capacities=[0.7, 0.4, 0.3])  # once accepted silently
    with pytest.raises(UserError, match=r"router\.json: field 'record_sha256': checksum "
                                        r"mismatch: router\.json was damaged or edited"):
        load_router(path, spec=spec)


def test_a_record_from_before_the_digest_is_read_and_checked(tmp_path, spec):
    path = _save(tmp_path / "r", spec)
    _edit(path, resign=None, capacities=[0.5, 0.4, 0.3])
    assert load_router(path, spec=spec).capacities == (0.5, 0.4, 0.3)
    where = str(path / "router.json")
    for field, value in (("window", 0), ("window", -3), ("capacities", [0.1, 0.1, 0.1]),
                         ("capacities", [1.0]), ("bits", [4, 3, 2]), ("hidden", 0)):
        _edit(path, resign=None, **{field: value})  # no digest to catch it: the checks do
        with pytest.raises(UserError) as err:
            load_router(path, spec=spec)
        assert (err.value.path, err.value.field) == (where, field)
        _edit(path, resign=None, **_meta(spec))


def test_a_binary_record_is_a_user_error(tmp_path, spec):
    path = _save(tmp_path / "r", spec)
    (path / "router.json").write_bytes(bytes(range(128, 256)))
    with pytest.raises(UserError, match=r"r/router\.json: not a UTF-8 JSON file"):
        load_router(path)


def test_a_truncated_record_says_where_the_json_breaks(tmp_path, spec):
    path = _save(tmp_path / "r", spec)
    text = (path / "router.json").read_text()
    (path / "router.json").write_text(text[:text.index('"capacities"') + 5])  # cut in a key
    with pytest.raises(UserError) as err:
        load_router(path)
    assert "malformed JSON: Unterminated string starting at line" in str(err.value)
    assert ", column " in str(err.value)


def test_a_save_interrupted_after_the_gate_is_refused_as_a_damaged_pair(tmp_path, spec,
                                                                         monkeypatch):
    path = _save(tmp_path / "r", spec, seed=1)
    real = router_store.atomic_write

    def interrupted(target, mode="w"):
        if target.name == "router.json":
            raise KeyboardInterrupt
        return real(target, mode)

    monkeypatch.setattr(router_store, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(path, spec, seed=2)
    with pytest.raises(UserError, match=r"gate\.safetensors: field 'sha256': checksum mismatch:"
                                        r" .* a save was interrupted between the two"):
        load_router(path)


def test_a_router_trained_on_another_quantization_of_the_store_is_refused(tmp_path, spec):
    from d2moe.core.sizes import QuantLayout

    trained = QuantLayout(kind="bitplane", b1=2, bK=8, group=64)
    path = _save(tmp_path / "r", spec, layout=trained.__dict__)
    assert load_router(path, spec=spec, store_layout=trained).bits == (2, 3, 4)
    with pytest.raises(UserError, match=r"router\.json: field 'layout': the router was "
                                        r"trained on a store quantized as bitplane 2\.\.8 "
                                        r"bits, groups of 64, this store is mwq 2\.\.8"):
        load_router(path, spec=spec, store_layout=QuantLayout(kind="mwq", b1=2, bK=8))
    with pytest.raises(UserError, match="groups of 32"):
        load_router(path, spec=spec, store_layout=QuantLayout(group=32))


def test_a_router_from_another_checkpoints_store_is_refused(tmp_path, spec):
    mine = {"path": "/ckpt/a", "expert_sha256": "a" * 64}
    path = _save(tmp_path / "r", spec, expert_sha256="a" * 64)
    for source in (mine, None):  # a store without a source cannot be compared: it passes
        assert load_router(path, spec=spec, store_source=source).bits == (2, 3, 4)
    with pytest.raises(UserError, match=r"router\.json: field 'expert_sha256': the router was "
                                        r"trained on a store quantized from other expert "
                                        r"weights than the store's \(/ckpt/b\)"):
        load_router(path, spec=spec, store_source={"path": "/ckpt/b", "expert_sha256": "b" * 64})
    old = _save(tmp_path / "old", spec)  # trained before stores recorded sources
    assert load_router(old, spec=spec, store_source=mine).bits == (2, 3, 4)
    _edit(path, resign=True, expert_sha256="A" * 64)
    with pytest.raises(UserError, match="field 'expert_sha256': expected the 64 lowercase hex"):
        load_router(path, spec=spec, store_source=mine)


def test_a_granularity_that_disagrees_with_the_gate_is_refused(tmp_path, spec):
    path = _save(tmp_path / "r", spec, granularity="token")
    assert load_router(path, spec=spec).bits == (2, 3, 4)
    for bogus in ("bogus", "slot"):  # this gate has no slots: a per-token gate
        _edit(path, resign=True, granularity=bogus)
        with pytest.raises(UserError, match=r"router\.json: field 'granularity'"):
            load_router(path, spec=spec)
