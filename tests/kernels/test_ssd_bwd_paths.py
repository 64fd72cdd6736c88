"""Backward paths of the Triton SSD that CONFIG picks only on the GPU or at some sizes (interpreted on CPU), each
against the float64 chunked reference through test_ssd_triton's `_check`: every gradient, documents, ngroups > 1,
float32 (1e-4) and bfloat16 (3e-2) I/O. The GPU's launch settings (warps, stages) do not change what the
interpreter computes; the paths below do."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lit_mamba2.kernels import ssd as ssd_kernels  # noqa: E402

import test_ssd_triton  # noqa: E402  (pytest puts this folder on sys.path)
from test_ssd_triton import _check, chunk_as_given  # noqa: E402,F401

# these paths are picked at the chunk size asked for (256 here): the kernels stay at it (max_chunk)
pytestmark = pytest.mark.usefixtures("chunk_as_given")


@pytest.mark.parametrize("fold,cb_share,docs,A_scale,dtype", [
    (True, 1, 0, 1.0, torch.float32),  # off-diagonal tiles folded, C·B^T tiles from the dCB kernel
    (False, 10**9, 3, 1.0, torch.float32),  # masked tiles, documents cutting blocks
    (True, 1, 0, 8.0, torch.float32),  # diagonal blocks that decay by > e^60 take the exact path
    (True, 1, 0, 1.0, torch.bfloat16),  # the transposed copy stored in bf16
])
def test_dx_reads_cb_transposed_from_dcb_kernel(monkeypatch, fold, cb_share, docs, A_scale, dtype):
    # CONFIG bwd_cbt: the dCB kernel stores C·B^T per causal tile pair and dx reads it (no C·B launch)
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_cbt", True)
    monkeypatch.setitem(ssd_kernels.CONFIG, "fold_decay", fold)
    monkeypatch.setitem(ssd_kernels.CONFIG, "cb_min_heads_per_group", cb_share)
    monkeypatch.setitem(ssd_kernels.CONFIG, "cb_min_dstate", 0)
    _check(256, (1, 300, 4, 16, 2, 16), dtype, docs=docs, A_scale=A_scale, conditioning=A_scale > 1)


@pytest.mark.parametrize("nseg,cs,shape,kw", [
    (3, 16, (2, 150, 2, 16, 1, 32), dict(docs=3)),  # 10 chunks in segments of 4, 4, 2; documents across them
    (4, 32, (1, 200, 4, 16, 2, 16), dict(docs=0, init=True)),  # 7 chunks in 2, 2, 2, 1; initial state's gradient
    (2, 16, (1, 40, 2, 16, 1, 16), dict(docs=0, init=False)),
    (7, 32, (1, 200, 2, 16, 1, 16), dict(docs=2, init=True)),  # one chunk per segment (7 is no power of 2)
    # weak decay (~e^-0.4 per chunk, not ~e^-7): the terms carried across whole segments are not negligible
    (3, 16, (2, 150, 2, 16, 1, 32), dict(docs=2, init=True, A_scale=0.05)),
])
def test_two_level_reverse_state_pass(monkeypatch, nseg, cs, shape, kw):
    # the segmented reverse state pass (chosen on the GPU when batch × heads leaves SMs idle, e.g. batch 1 × 64K):
    # segments walked from zero, chained by a scan, their chunks' gradients and d cum_last fixed up elementwise
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_state_segments", nseg)
    _check(cs, shape, torch.float32, **kw)


def test_two_level_reverse_state_pass_without_final_state_gradient(monkeypatch):
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_state_segments", 3)
    _check(16, (1, 100, 2, 16, 1, 16), torch.float32, final=False, docs=1)


def test_two_level_reverse_state_pass_bfloat16(monkeypatch):
    # the fix-up adds to gradients the walk stored in bf16 (a second rounding) and to d cum_last's float32 partials
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_state_segments", 3)
    _check(16, (2, 150, 2, 16, 1, 32), torch.bfloat16, docs=2, init=True, A_scale=0.05)


def _documents_at(monkeypatch, cuts):
    """test_ssd_triton's inputs with documents starting at the positions `cuts` (every row alike)."""
    inputs = test_ssd_triton._inputs

    def with_docs(*args, **kw):
        out = list(inputs(*args, **kw))
        seq = torch.zeros(args[0], args[1], dtype=torch.int32)
        for cut in cuts:
            seq[:, cut:] += 1
        out[-1] = seq
        return tuple(out)

    monkeypatch.setattr(test_ssd_triton, "_inputs", with_docs)


@pytest.mark.parametrize("cuts", [(63, 64, 100, 128), (64, 127, 128), (40, 100)])
def test_two_level_reverse_state_pass_documents_on_segment_edges(monkeypatch, cuts):
    # 10 chunks of 16 in segments of 4, 4, 2 (starting at positions 0, 64, 128): documents that start exactly on a
    # segment's first position, on its last, a one-position document, ones inside a chunk. A chunk that starts a
    # document zeroes the decay product, which must stop the fix-up's terms exactly as one walk stops the gradient
    # ((40, 100): segments whose exiting gradients are not zero, cut inside)
    _documents_at(monkeypatch, cuts)
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_state_segments", 3)
    _check(16, (1, 150, 2, 16, 1, 32), torch.float32, init=True, A_scale=0.05)


def test_segments_are_chosen_when_batch_times_heads_is_small():
    # batch 1 × 32 heads × 2 dstate blocks, 256 chunks: segmented; batch 16: one pass; batch 4 at dstate 128 (the
    # fix-up's bytes grow with dstate): one pass, batch 2 segmented; at dstate 64 batch 2 segmented
    nseg, seg_len = ssd_kernels._bwd_state_segments(1, 32, 64, 128, 256)
    assert nseg > 1 and seg_len >= ssd_kernels.CONFIG["bwd_state_seg_chunks"] and nseg * seg_len >= 256
    assert (nseg - 1) * seg_len < 256
    assert ssd_kernels._bwd_state_segments(16, 32, 64, 128, 16) == (1, 16)
    assert ssd_kernels._bwd_state_segments(4, 32, 64, 128, 128) == (1, 128)
    assert ssd_kernels._bwd_state_segments(2, 32, 64, 128, 256)[0] > 1
    assert ssd_kernels._bwd_state_segments(2, 32, 64, 64, 128)[0] > 1


@pytest.mark.parametrize("heads_fast,docs,dtype", [(True, 0, torch.float32), (True, 2, torch.bfloat16),
                                                   (False, 2, torch.float32), (None, 2, torch.float32)])
def test_dx_grid_order(monkeypatch, heads_fast, docs, dtype):
    # dx_heads_fastest: grid (batch·heads, blocks) or (blocks, batch·heads); ngroups 2, batch 2; None with a 0-byte
    # threshold: the automatic choice, taking heads fastest
    monkeypatch.setitem(ssd_kernels.CONFIG, "dx_heads_fastest", heads_fast)
    monkeypatch.setitem(ssd_kernels.CONFIG, "dx_heads_fastest_bytes", 0)
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_cbt", True)
    _check(256, (2, 300, 4, 16, 2, 16), dtype, docs=docs)


@pytest.mark.parametrize("nseg", [1, 3])
def test_dcum_last_as_row_sums(monkeypatch, nseg):
    # bwd_state_dcl_rows: the reverse state pass leaves d cum_last as per-row partials, summed by the dt kernel (the
    # two-level pass's fix-up adds to the same rows)
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_state_dcl_rows", True)
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_state_segments", nseg)
    _check(16, (2, 100, 2, 16, 1, 32), torch.float32, docs=2)
