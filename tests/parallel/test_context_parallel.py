"""Context parallelism (lit_mamba2.parallel.context) on several CPU processes (gloo): each rank holds a contiguous
slice of every row, and the logits and every parameter's gradient equal one process's run on the whole rows
(float64), for a hybrid (Mamba-2 layers, an attention layer with its qkv conv) and a Mamba-2 model gated by z, with
slices not aligned to the SSD's chunks and packed documents that start on, just before and just after rank
boundaries, or span whole slices; and on the Triton kernels (interpreted on CPU) against the reference."""

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.parallel.context import apply_context_parallel, slice_batch

from .gloo import run

MODELS = {
    "hybrid": ("mamba2attn-test", {}),  # chunk_size 16, ngroups 2, attention with a qkv conv (d_conv 4)
    "z-gated": ("mamba2-test", {"ssm_cfg": {"rmsnorm": False}}),  # z gates inside the SSD op
}


def build(name):
    preset, overrides = MODELS[name]
    torch.manual_seed(0)
    return Mamba2LMHeadModel(Mamba2Config.from_name(preset, **overrides)).double()


def document_ids(T, starts_per_row):
    rows = []
    for starts in starts_per_row:
        s = torch.zeros(T, dtype=torch.int32)
        for p in starts:
            if 0 < p < T:
                s[p:] += 1
        rows.append(s)
    return torch.stack(rows)


def batch(cp, n, documents=True):
    """4 rows of cp slices of n positions; documents starting on rank boundaries (n, 3n), one and two positions
    around them (so that the conv's halo mixes documents), at the row's last position, and spanning whole slices."""
    T = cp * n
    g = torch.Generator().manual_seed(cp)
    ids = torch.randint(0, 256, (4, T + 1), generator=g)
    out = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    if documents:
        out["seq_idx"] = document_ids(T, [[], [n, 3 * n], [n - 1, 2 * n + 1, T - 1], [n - 2, n + 1, 3 * n - 1]])
    return out


def loss_sum(model, b):
    return model.loss(b["input_ids"], b["labels"], seq_idx=b.get("seq_idx"), positions=b.get("positions"),
                      reduction="sum")


def _check(rank, world, n):
    cp = world
    import torch.distributed as dist

    for name in MODELS:
        for documents in (True, False):
            whole = batch(cp, n, documents)
            ref = build(name)
            ref_logits = ref(whole["input_ids"], seq_idx=whole.get("seq_idx"))
            loss_sum(ref, whole).backward()

            model = apply_context_parallel(build(name))
            mine = slice_batch(whole, rank, cp)
            logits = model(mine["input_ids"], seq_idx=mine.get("seq_idx"), positions=mine["positions"])
            loss_sum(model, mine).backward()  # this rank's share of the whole rows' loss
            every = [torch.empty_like(logits) for _ in range(cp)]
            dist.all_gather(every, logits.contiguous())
            case = f"{name}, documents={documents}, rank {rank}"
            torch.testing.assert_close(torch.cat(every, dim=1), ref_logits, rtol=1e-10, atol=1e-10, msg=case)
            for pname, p in model.named_parameters():
                grad = p.grad.clone()
                dist.all_reduce(grad)
                ref_grad = dict(ref.named_parameters())[pname].grad
                assert ref_grad.abs().max() > 0, (case, pname)  # every parameter takes part
                torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10, msg=f"{case}: {pname}")
            if name == "hybrid":  # positions derived from a slice would restart the rotary phases there
                with pytest.raises(ValueError, match="context parallel: the model needs `positions`"):
                    model(mine["input_ids"], seq_idx=mine.get("seq_idx"))


@pytest.mark.parametrize("cp,n", [(2, 21), (4, 11)])  # slices of 21 and 11 positions: chunks of 16 straddle them
def test_slices_give_the_whole_rows_outputs_and_gradients(cp, n):
    run(cp, _check, n)


def test_slice_batch_computes_positions_on_the_whole_row():
    b = batch(2, 5)
    halves = [slice_batch(b, r, 2) for r in range(2)]
    # row 1: document 1 starts at 5 (the second slice's first position), row 2 one position before (at 4)
    assert halves[1]["positions"][1].tolist() == [0, 1, 2, 3, 4]
    assert halves[1]["positions"][2].tolist() == [1, 2, 3, 4, 0]  # (and one more at the last position)
    assert halves[1]["positions"][0].tolist() == [5, 6, 7, 8, 9]
    assert torch.equal(torch.cat([h["labels"] for h in halves], 1), b["labels"])
    with pytest.raises(ValueError, match="sequence length 10 is not divisible by parallel.cp = 3"):
        slice_batch(b, 0, 3)


def _check_kernels(rank, world, n):
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # (before triton is imported: the kernels on CPU tensors)
    import torch.distributed as dist

    whole = {k: v[2:] for k, v in batch(world, n).items()}  # the rows whose documents cross the boundaries
    ref = build("hybrid").float()  # one process, the PyTorch reference ops
    ref_logits = ref(whole["input_ids"], seq_idx=whole["seq_idx"])
    loss_sum(ref, whole).backward()
    model = apply_context_parallel(build("hybrid").float().set_impl("triton"))
    mine = slice_batch(whole, rank, world)
    logits = model(mine["input_ids"], seq_idx=mine["seq_idx"], positions=mine["positions"])
    loss_sum(model, mine).backward()
    every = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(every, logits.contiguous())
    torch.testing.assert_close(torch.cat(every, dim=1), ref_logits, rtol=1e-4, atol=1e-5)
    for pname, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, dict(ref.named_parameters())[pname].grad, rtol=1e-4, atol=1e-5, msg=pname)


def test_on_the_triton_kernels():
    """The kernels' initial conv states, final SSD states and their gradients (what the GPU path runs), float32."""
    pytest.importorskip("triton")
    run(2, _check_kernels, 21)
