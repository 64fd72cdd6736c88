"""Forward paths of the Triton SSD that the default CONFIG takes only at large sizes, forced here on small shapes and
checked (forward and every gradient, since the backward reads the forward's entering states) against the float64
chunked reference: the two-level state pass (segments walked in parallel, chained by a scan, their chunks' entering
states fixed up) and the output kernel with tall position blocks over narrower source blocks (out_bm / out_bk),
folded or masked, with C·B in bfloat16, each with documents, an initial state, ragged seqlen and strong decay.
Tolerances as in test_ssd_triton.py."""

import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lit_mamba2.kernels import ssd as ssd_kernels  # noqa: E402

from lit_mamba2 import reference  # noqa: E402
from test_ssd_triton import _check, _inputs, _rel, chunk_as_given  # noqa: E402,F401

# these paths are picked at the chunk size asked for (256 here): the kernels stay at it (max_chunk)
pytestmark = pytest.mark.usefixtures("chunk_as_given")


def _check_forward(cs, shape, **kw):
    """Output and final state only (float32, 1e-4 as in _check): for output-kernel paths, which the backward
    does not read (the pre-gate y it reads is y / silu(z), checked through y)."""
    x, dt, A, B, C, D, z, bias, h0, seq = _inputs(*shape, torch.float32, **kw)
    y, fin = ssd_kernels.ssd(x, dt, A, B, C, cs, D, z, bias, h0, seq, True, (0.0, math.inf), True)
    d = [t.double() if t is not None else None for t in (x, dt, A, B, C, D, z, bias, h0)]
    yr, finr = reference.ssd_chunked(*d[:5], cs, *d[5:], seq, True, (0.0, math.inf), True)
    assert torch.isfinite(y).all()
    assert _rel(y, yr) < 1e-4 and _rel(fin, finr) < 1e-4, (_rel(y, yr), _rel(fin, finr))


@pytest.mark.parametrize("cs,shape,min_chunks,kw", [
    # (batch, seqlen, nheads, headdim, ngroups, dstate); 10 chunks in segments of 2 (the last one ragged)
    (16, (2, 150, 2, 16, 1, 16), 2, dict(docs=3)),
    # 7 chunks in segments of 3 + 3 + 1, no initial state, ngroups 2, a headdim that is not a power of two
    (16, (1, 100, 4, 24, 2, 16), 3, dict(init=False, D="headdim")),
    # segments of one chunk, decay strong enough that whole segments underflow to 0
    (32, (1, 160, 2, 16, 1, 32), 1, dict(docs=1, A_scale=20.0)),
])
def test_two_level_state_pass(monkeypatch, cs, shape, min_chunks, kw):
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_programs", 10**6)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_below", None)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_min_chunks", min_chunks)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_min_nc", 0)
    NC = -(-shape[1] // cs)
    plan = ssd_kernels._fwd_state_plan(shape[0], shape[2], shape[3], shape[5], NC)
    assert plan[3] > 1, plan  # the test would not exercise segments otherwise
    _check(cs, shape, torch.float32, conditioning=kw.get("A_scale", 1.0) > 1, **kw)


def test_two_level_state_pass_bfloat16(monkeypatch):
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_programs", 10**6)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_below", None)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_min_chunks", 2)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_min_nc", 0)
    _check(16, (1, 90, 2, 32, 1, 32), torch.bfloat16, docs=2)


def test_two_level_plan_below_one_count_of_programs_towards_another(monkeypatch):
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_programs", 384)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_below", 256)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_min_chunks", 4)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_min_nc", 128)
    # batch 4 x 32 heads x 2 dstate blocks = 256 programs: not below 256, one walk
    assert ssd_kernels._fwd_state_plan(4, 32, 64, 128, 128)[3] == 1
    # batch 2: 128 programs, 3 segments make 384; batch 1: 6 segments (of 86 chunks, the last 82)
    assert ssd_kernels._fwd_state_plan(2, 32, 64, 128, 256)[2:] == (86, 3)
    assert ssd_kernels._fwd_state_plan(1, 32, 64, 128, 512)[2:] == (86, 6)


def test_two_level_plan_only_when_the_grid_is_small_and_the_walk_long(monkeypatch):
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_programs", 1024)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_below", None)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_min_chunks", 4)
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_min_nc", 256)
    # batch 16 x 32 heads x 2 dstate blocks = 1024 programs: one walk; batch 1 at 256 chunks: 16 segments of 16
    assert ssd_kernels._fwd_state_plan(16, 32, 64, 128, 16)[2:] == (16, 1)
    assert ssd_kernels._fwd_state_plan(1, 32, 64, 128, 256)[2:] == (16, 16)
    # batch 2 at 128 chunks: a walk too short to pay for reading x twice
    assert ssd_kernels._fwd_state_plan(2, 32, 64, 128, 128)[3] == 1
    monkeypatch.setitem(ssd_kernels.CONFIG, "state_seg_min_nc", 0)
    assert ssd_kernels._fwd_state_plan(2, 32, 64, 128, 128)[2:] == (16, 8)
    assert ssd_kernels._fwd_state_plan(1, 32, 64, 128, 7)[3] == 1  # too few chunks to cut


@pytest.mark.parametrize("bm,bk,fold,cb_min_dstate,docs,A_scale", [
    (128, 64, True, 0, 0, 1.0),  # folded off-diagonal blocks, C·B loaded
    (128, 32, True, 10**9, 0, 1.0),  # C·B recomputed, 4 source blocks per diagonal
    (128, 64, False, 0, 3, 1.0),  # documents cut blocks: masked tiles everywhere
    (64, 32, True, 10**9, 0, 8.0),  # strong decay: the diagonal blocks' exact path, rectangular
    (128, 128, True, 0, 0, 1.0),  # square 128 tiles: two position blocks per chunk
])
def test_out_kernel_blocks(monkeypatch, bm, bk, fold, cb_min_dstate, docs, A_scale):
    monkeypatch.setitem(ssd_kernels.CONFIG, "out_bm", bm)
    monkeypatch.setitem(ssd_kernels.CONFIG, "out_bk", bk)
    monkeypatch.setitem(ssd_kernels.CONFIG, "out_fold_decay", fold)
    monkeypatch.setitem(ssd_kernels.CONFIG, "cb_min_heads_per_group", 1)
    monkeypatch.setitem(ssd_kernels.CONFIG, "out_cb_min_dstate", cb_min_dstate)
    _check_forward(256, (1, 300, 4, 16, 2, 16), docs=docs, A_scale=A_scale)


@pytest.mark.parametrize("bm,bk,fold,docs", [(64, 32, False, 0), (64, 64, True, 0), (64, 64, True, 2),
                                             (128, 32, True, 2)])
def test_out_kernel_bfloat16_cb(monkeypatch, bm, bk, fold, docs):
    # bfloat16 inputs: C·B precomputed and stored in bfloat16, read by folded and masked blocks; forward and every
    # gradient (the backward computes its own C·B)
    for key, v in dict(out_bm=bm, out_bk=bk, out_fold_decay=fold, cb_min_heads_per_group=1,
                       out_cb_min_dstate=0).items():
        monkeypatch.setitem(ssd_kernels.CONFIG, key, v)
    _check(256, (1, 300, 2, 32, 1, 32), torch.bfloat16, docs=docs)


def test_out_kernel_float16_keeps_float32_cb(monkeypatch):
    # float16 inputs with C·B precomputed: stored in float32 (float16's range is too small for it in general)
    monkeypatch.setitem(ssd_kernels.CONFIG, "cb_min_heads_per_group", 1)
    monkeypatch.setitem(ssd_kernels.CONFIG, "out_cb_min_dstate", 0)
    _check(256, (1, 300, 2, 32, 1, 32), torch.float16)


@pytest.mark.parametrize("bm,bk,dtype,fold", [(64, 64, torch.float32, True), (64, 32, torch.float32, True),
                                              (128, 64, torch.float32, True), (64, 32, torch.bfloat16, False),
                                              (64, 64, torch.bfloat16, True)])
def test_forward_never_reads_unwritten_memory(monkeypatch, bm, bk, dtype, fold):
    # every buffer the forward allocates starts as NaN: the causal-only C·B (blocks above the diagonal unwritten),
    # the segment buffers of the two-level pass (segment 0's slot is never written) and the padded tails must never
    # reach the output
    real_empty = torch.empty

    def nan_empty(*args, **kw):
        t = real_empty(*args, **kw)
        return t.fill_(math.nan) if t.is_floating_point() else t

    for key, v in dict(out_bm=bm, out_bk=bk, cb_min_heads_per_group=1, out_cb_min_dstate=0, out_fold_decay=fold,
                       state_seg_programs=10**6, state_seg_below=None, state_seg_min_chunks=1,
                       state_seg_min_nc=0).items():
        monkeypatch.setitem(ssd_kernels.CONFIG, key, v)
    x, dt, A, B, C, D, z, bias, h0, seq = _inputs(1, 300, 2, 16, 1, 16, dtype)
    monkeypatch.setattr(torch, "empty", nan_empty)
    y, fin = ssd_kernels.ssd(x, dt, A, B, C, 256, D, z, bias, h0, seq, True, (0.0, math.inf), True)
    monkeypatch.setattr(torch, "empty", real_empty)
    d = [t.double() if t is not None else None for t in (x, dt, A, B, C, D, z, bias, h0)]
    yr, finr = reference.ssd_chunked(*d[:5], 256, *d[5:], seq, True, (0.0, math.inf), True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.isfinite(y).all() and _rel(y, yr) < tol and _rel(fin, finr) < tol


@pytest.mark.parametrize("bk,min_programs", [(128, 10**6), (256, 0)])
def test_state_pass_positions_per_dot(monkeypatch, bk, min_programs):
    # the forward state pass's own dot length (and headdim blocks shrunk to 16 by a large grid target)
    monkeypatch.setitem(ssd_kernels.CONFIG, "fwd_state_bk", bk)
    monkeypatch.setitem(ssd_kernels.CONFIG, "fwd_state_min_programs", min_programs)
    _check(256, (1, 300, 2, 32, 1, 16), torch.float32, docs=2, conditioning=True)  # dA: as with the defaults
