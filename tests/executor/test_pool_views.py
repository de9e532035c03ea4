"""The CPU pool's row-major levels: converted straight into their blocks, read back as
per-plane views that dequantize to the store's matrices bit for bit, also after the arena
moved them; the word-major (CUDA) layout holds the same bytes transposed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2moe.core.jobs import Evict, ExpertKey, Load
from d2moe.core.sizes import QuantLayout, expert_bytes
from d2moe.core.spec import ModelSpec
from d2moe.executor.levels import LevelFormat
from d2moe.executor.pool import ExpertPool
from d2moe.kernels.torch_fallback import PlaneViews, dequantize_fast
from d2moe.quant.nested import quantize_matrix
from d2moe.quant.reference import dequantize
from d2moe.quant.store import StoreReader, StoreWriter, tensor_shapes

# hidden 40: w1/w3 rows of 40 columns (a partial int32 word, a partial group)
SPEC = ModelSpec(name="small", layers=1, experts=3, top_k=1, hidden=40, ffn=96, heads=1,
                 kv_heads=1, vocab=16)


@pytest.fixture(scope="module", params=["mwq", "bitplane"])
def store(request, tmp_path_factory):
    layout = QuantLayout(kind=request.param, b1=2, bK=5, group=32)
    path = tmp_path_factory.mktemp(request.param) / "store"
    rng = np.random.default_rng(0)
    writer = StoreWriter(path, SPEC, layout)
    writer.write_layer(0, ((e, {t: quantize_matrix(rng.standard_normal(s).astype(np.float32),
                                                   layout)
                                for t, s in tensor_shapes(SPEC).items()})
                           for e in range(SPEC.experts)))
    writer.close()
    return StoreReader(path)


def _check_views(pool: ExpertPool, store: StoreReader, expert: int, bits: int) -> None:
    want = store.read_expert(0, expert, bits)
    with pool.moving:
        got = pool.matrices(ExpertKey(0, expert), bits)
        for t, v in got.items():
            assert isinstance(v, PlaneViews)
            w = dequantize_fast(v, bits)
            assert torch.equal(w.view(torch.int32), dequantize(want[t], bits).view(torch.int32))


def test_cpu_pool_views_equal_the_store_and_survive_compaction(store):
    layout = store.layout
    budget = 2 * expert_bytes(SPEC, layout.bK, layout)
    pool = ExpertPool(SPEC, layout, budget, torch.device("cpu"))
    assert pool.fmt.row_major
    for e in (0, 1):
        pool.admit_stored(Load(ExpertKey(0, e), 0, 4), store.read_planes(0, e, 0, 4))
    _check_views(pool, store, 0, 4)
    _check_views(pool, store, 1, 3)
    pool.evict(Evict(ExpertKey(0, 0), 4, 0))  # a hole at the front ...
    moved = pool.blocks[ExpertKey(0, 1)][layout.b1].offset
    with pool.moving:
        pool.arena.compact()  # ... closed: expert 1 moves, its cached views must not be used
    assert pool.blocks[ExpertKey(0, 1)][layout.b1].offset < moved
    pool.admit_stored(Load(ExpertKey(0, 2), 0, 5), store.read_planes(0, 2, 0, 5))
    _check_views(pool, store, 1, 4)
    _check_views(pool, store, 2, 5)
    pool.admit_stored(Load(ExpertKey(0, 1), 4, 5), store.read_planes(0, 1, 4, 5))
    _check_views(pool, store, 1, 5)
    assert pool.accounting.peak_bytes <= budget


def test_convert_into_a_block_equals_convert_and_layouts_are_transposes(store):
    layout = store.layout
    row, word = LevelFormat(SPEC, layout, row_major=True), LevelFormat(SPEC, layout)
    for bits in range(layout.b1, layout.bK + 1):
        raw = store.read_planes(0, 1, 0 if bits == layout.b1 else bits - 1, bits)[bits]
        a = row.convert(bits, raw)
        out = np.full(row.nbytes(bits), 7, np.uint8)
        assert row.convert(bits, raw, out=out) is out and np.array_equal(out, a)
        b = word.convert(bits, raw)
        assert a.size == b.size == row.nbytes(bits)
        pos = 0
        for tensor, part, n in row.parts(bits):
            g = row.geoms[tensor]
            dtype, shape = (np.int32, (g.rows, g.words)) if part.startswith("plane") else \
                (np.float16, (g.rows, g.groups))
            mine = a[pos:pos + n].view(dtype).reshape(shape)
            theirs = b[pos:pos + n].view(dtype).reshape(shape[::-1])
            assert np.array_equal(mine, theirs.T, equal_nan=True), (bits, tensor, part)
            pos += n


def test_cpu_pool_keeps_kernel_inputs_until_a_level_moves_or_goes(store, monkeypatch):
    from d2moe.executor import pool as pool_mod

    layout = store.layout
    pool = ExpertPool(SPEC, layout, 3 * expert_bytes(SPEC, layout.bK, layout),
                      torch.device("cpu"))
    for e in (0, 1):
        pool.admit_stored(Load(ExpertKey(0, e), 0, 4), store.read_planes(0, e, 0, 4))
    with pool.moving:
        first = pool.matrices(ExpertKey(0, 1), 4)
        assert pool.matrices(ExpertKey(0, 1), 4) is first  # kept: same objects, same params
        assert pool.matrices(ExpertKey(0, 1), 3) is not first
    _check_views(pool, store, 1, 4)  # prepares parameters on the kept views
    assert first["w1"].prepared
    pool.evict(Evict(ExpertKey(0, 0), 4, 0))
    with pool.moving:
        pool.arena.compact()  # expert 1 moves: its kept inputs must not be returned
        assert pool.matrices(ExpertKey(0, 1), 4) is not first
    _check_views(pool, store, 1, 4)
    pool.evict(Evict(ExpertKey(0, 1), 4, 3))  # level 4 gone: (1, 4) forgotten, (1, 3) kept
    assert (ExpertKey(0, 1), 4) not in pool._inputs  # noqa: SLF001
    _check_views(pool, store, 1, 3)
    # the kept parameters' bytes stay under the cap: least recently used go first
    one = sum(pool_mod.prepared_nbytes(v, 3) for v in pool.matrices(ExpertKey(0, 1), 3).values())
    monkeypatch.setattr(pool_mod, "PREPARED_CAP_BYTES", one)
    pool.admit_stored(Load(ExpertKey(0, 2), 0, 3), store.read_planes(0, 2, 0, 3))
    _check_views(pool, store, 2, 3)
    assert list(pool._inputs) == [(ExpertKey(0, 2), 3)]  # noqa: SLF001
    assert pool._inputs_bytes == one  # noqa: SLF001
    _check_views(pool, store, 1, 3)
    monkeypatch.setattr(pool_mod, "PREPARED_CAP_BYTES", one - 1)  # too big to keep: rebuilt
    with pool.moving:
        assert pool.matrices(ExpertKey(0, 2), 3) is not pool.matrices(ExpertKey(0, 2), 3)


def test_word_major_views_are_the_store_where_the_blocks_lie(store):
    # the CUDA pool's kernel inputs, built on the CPU: levels in word-major (CUDA) layout at
    # shuffled places of one buffer, read as per-plane views (no stacking copy)
    from d2moe.executor.arena import Block
    from d2moe.executor.pool import packed_views
    from d2moe.kernels.packed import PackedExpertMatrix
    from d2moe.quant.reference import dequantize_packed

    layout = store.layout
    fmt = LevelFormat(SPEC, layout)
    levels = list(range(layout.b1, layout.bK + 1))
    slot = max(fmt.nbytes(b) for b in levels) + 256
    buffer = torch.full((slot * len(levels),), 0xAB, dtype=torch.uint8)
    blocks = {}
    for bits, k in zip(levels, [2, 0, 3, 1][:len(levels)], strict=True):
        data = fmt.convert(bits, store.read_planes(0, 1, 0 if bits == layout.b1 else bits - 1,
                                                   bits)[bits])
        buffer[k * slot:k * slot + data.size] = torch.from_numpy(data)
        blocks[bits] = Block(k * slot, data.size, None)
    want = store.read_expert(0, 1, layout.bK)
    for bits in levels:
        got = packed_views(buffer, fmt, layout, blocks, bits)
        for t, p in got.items():
            assert isinstance(p, PackedExpertMatrix) and p.bits_held == bits
            lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
            assert all(lo <= v.data_ptr() < hi for v in p.planes)  # views, no copy
            assert torch.equal(dequantize_packed(p, bits), dequantize(want[t], bits)), (t, bits)


def test_word_major_pool_hands_the_kernels_its_blocks_and_keeps_them(store):
    # the CUDA pool's path on the CPU (word_major): loads, kernel inputs viewing the level
    # blocks, kept across runs until a level moves, and the Triton kernel (interpreter) on
    # them equal to the same matrix stacked
    import os

    from d2moe.kernels.packed import PackedExpertMatrix
    from d2moe.quant.reference import dequantize_packed

    layout = store.layout
    pool = ExpertPool(SPEC, layout, 2 * expert_bytes(SPEC, layout.bK, layout),
                      torch.device("cpu"), word_major=True)
    assert not pool.fmt.row_major
    for e in (0, 1):
        pool.admit_stored(Load(ExpertKey(0, e), 0, 4), store.read_planes(0, e, 0, 4))
    key = ExpertKey(0, 1)
    want = store.read_expert(0, 1, 4)
    with pool.moving:
        first = pool.matrices(key, 4)
        assert pool.matrices(key, 4) is first  # kept
    for t, p in first.items():
        assert isinstance(p, PackedExpertMatrix) and isinstance(p.planes, tuple)
        assert torch.equal(dequantize_packed(p, 4), dequantize(want[t], 4))
    pool.evict(Evict(ExpertKey(0, 0), 4, 0))
    with pool.moving:
        pool.arena.compact()  # expert 1 moves: new views of its new place
        moved = pool.matrices(key, 4)
    assert moved is not first
    assert all(torch.equal(dequantize_packed(moved[t], 4), dequantize(want[t], 4))
               for t in moved)
    if os.environ.get("TRITON_INTERPRET") == "1":
        from d2moe.kernels.triton_launch import nested_matmul

        p = moved["w1"]
        stacked = PackedExpertMatrix(kind=p.kind, b1=p.b1, bK=p.bK, group=p.group,
                                     rows=p.rows, cols=p.cols, planes=torch.stack(p.planes),
                                     scale=p.scale, zero=p.zero,
                                     plane_scale=(torch.stack(p.plane_scale) if p.plane_scale
                                                  else torch.zeros(0, p.groups, p.rows,
                                                                   dtype=torch.float16)))
        x = torch.randn(1, p.cols)
        assert torch.equal(nested_matmul(x, p, 4), nested_matmul(x, stacked, 4))
        # w1 and w3 in one launch where the pool's blocks hold them (their offsets differ)
        from d2moe.kernels.triton_launch import gate_up, matrix_args

        assert matrix_args(moved["w1"], 4)[4] != matrix_args(moved["w3"], 4)[4]
        h = gate_up(x, moved["w1"], moved["w3"], 4)
        want = (torch.nn.functional.silu(nested_matmul(x, moved["w1"], 4))
                * nested_matmul(x, moved["w3"], 4))
        assert torch.allclose(h, want, rtol=1e-4, atol=1e-5)


def test_a_budget_above_every_expert_allocates_only_every_expert(store, monkeypatch):
    """The arena holds at most every expert at its widest level, whatever the budget (200
    GiB asked of a 24 GiB machine allocated 200 GiB and died in torch's allocator); the
    accounting keeps the budget. A pool the device cannot hold is a UserError naming it."""
    from d2moe.core.errors import UserError
    from d2moe.core.sizes import all_experts_bytes

    layout = store.layout
    every = all_experts_bytes(SPEC, layout.bK, layout)
    fits = ExpertPool(SPEC, layout, every, torch.device("cpu"))
    huge = ExpertPool(SPEC, layout, 200 << 30, torch.device("cpu"))
    assert huge.capacity_bytes == fits.capacity_bytes < 2 * every
    assert huge.accounting.budget_bytes == 200 << 30
    for e in range(SPEC.experts):  # every expert at its widest level fits the capped arena
        huge.admit_stored(Load(ExpertKey(0, e), 0, layout.bK),
                          store.read_planes(0, e, 0, layout.bK))
    _check_views(huge, store, SPEC.experts - 1, layout.bK)

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] can't allocate memory")

    monkeypatch.setattr(torch, "zeros", no_memory)
    with pytest.raises(UserError, match=r"cannot allocate an expert pool of .* on cpu") as err:
        ExpertPool(SPEC, layout, every, torch.device("cpu"))
    assert err.value.field == "budget"
