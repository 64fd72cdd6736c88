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

from test_ssd_triton import _check  # noqa: E402  (pytest puts this folder on sys.path)


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
