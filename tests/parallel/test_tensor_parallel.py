"""Tensor parallelism (lit_mamba2.parallel.tensor) on several CPU processes (gloo), in float64: the logits, the loss
and every parameter's gradient (made whole again) equal one process's, for ngroups % tp == 0 and tp % ngroups == 0
(the gated norm's sum of squares shared), pure and hybrid models; the clipping norm counts every element once;
FSDP2 × tp = 2 × 2 trains as one process, clipping included; layouts that cannot split the model are named."""

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.parallel import LayoutError, ParallelDims
from lit_mamba2.parallel.tensor import (apply_tensor_parallel, check_tensor_parallel, grad_norm,
                                        sync_replicated_grads, to_whole)

from .gloo import run

CONFIGS = {
    "pure, ngroups 2": ("mamba2-test", {}),
    "pure, ngroups 1": ("mamba2-test", {"ssm_cfg": {"ngroups": 1}}),
    "hybrid, ngroups 2": ("mamba2attn-test", {}),
    # every segment at once: the channels beside the SSM (d_ssm < d_inner), biases, D per channel, the norm
    # before the gate, the attention's MLP, an untied LM head
    "hybrid, ngroups 1, all segments": ("mamba2attn-test", {
        "ssm_cfg": {"ngroups": 1, "d_ssm": 64, "bias": True, "D_has_hdim": True, "norm_before_gate": True},
        "attn_cfg": {"mlp_dim": 64, "qkv_proj_bias": True, "out_proj_bias": True}, "tie_embeddings": False}),
}


def build(name):
    preset, overrides = CONFIGS[name]
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name(preset, **overrides)).double()
    with torch.no_grad():  # D = 1, norms = 1 at init: perturb so that every gradient path carries its own values
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 33), generator=g)
    seq_idx = torch.tensor([[0] * 20 + [1] * 12, [0] * 32], dtype=torch.int32)
    return ids[:, :-1], ids[:, 1:].clone().index_fill_(1, torch.tensor([5]), -100), seq_idx


def outputs(model, whole=lambda name, t: t):
    ids, labels, seq_idx = batch()
    logits = model(ids, seq_idx=seq_idx).detach()
    loss = model.loss(ids, labels, seq_idx=seq_idx)
    loss.backward()
    sync_replicated_grads(model)
    grads = {n: whole(n, p.grad) for n, p in model.named_parameters()}
    return logits, loss.detach(), grads, grad_norm(model)


def _split(rank, world, names, out):
    mesh = ParallelDims.resolve(world, dp_shard=1, tp=world).build_mesh("cpu")
    results = {}
    for name in names:
        model = apply_tensor_parallel(build(name), mesh.world["tp"])
        results[name] = outputs(model, lambda n, t: to_whole(model.tensor_parallel, n, t))
    if rank == 0:
        torch.save(results, out)


def check(results, names):
    for name in names:
        ref_logits, ref_loss, ref_grads, _ = outputs(build(name))
        logits, loss, grads, norm = results[name]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10, msg=name)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12, msg=name)
        assert grads.keys() == ref_grads.keys(), name
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-9, atol=1e-11, msg=f"{name}: {n}")
        # the global norm, against torch's over the one process's whole gradients
        ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()]))
        torch.testing.assert_close(norm, ref_norm, rtol=1e-10, atol=0, msg=name)


def test_tp2_equals_one_process(tmp_path):
    run(2, _split, list(CONFIGS), str(tmp_path / "out.pt"))
    check(torch.load(tmp_path / "out.pt"), list(CONFIGS))


def test_layouts_that_cannot_split_the_model_are_named():
    cfg = Mamba2Config.from_name
    with pytest.raises(LayoutError, match=r"parallel.tp = 2 and ssm_cfg.ngroups = 3"):
        check_tensor_parallel(cfg("mamba2-test", d_model=48, ssm_cfg={"ngroups": 3}), 2)
    with pytest.raises(LayoutError, match=r"parallel.tp = 4 does not divide the attention heads: "
                                          r"attn_cfg.num_heads = 30"):
        check_tensor_parallel(cfg("mamba2attn-2.7b"), 4)
    check_tensor_parallel(cfg("mamba2attn-2.7b"), 2)
    check_tensor_parallel(cfg("mamba2-2.7b"), 8)  # ngroups 1: shared by the 8 ranks
    with pytest.raises(LayoutError, match=r"attn_cfg.num_heads_kv = 2"):
        check_tensor_parallel(cfg("mamba2attn-test"), 4)
    with pytest.raises(LayoutError, match=r"parallel.tp = 16 does not divide the Mamba-2 heads \(nheads = 8\)"):
        check_tensor_parallel(cfg("mamba2-test", ssm_cfg={"ngroups": 1}), 16)
    with pytest.raises(LayoutError, match=r"parallel.tp = 16 does not divide the padded vocabulary \(264\)"):
        check_tensor_parallel(cfg("mamba2-test", vocab_size=260, pad_vocab_size_multiple=8,
                                  ssm_cfg={"ngroups": 1, "headdim": 8}), 16)


def train(model, dp_rank=0, dp=1, steps=3, max_norm=0.05):
    """`steps` AdamW steps with gradient clipping (tight enough to clip) on this data-parallel rank's rows of one
    global batch; returns the global losses."""
    from lit_mamba2.parallel.tensor import clip_grad_norm_
    from lit_mamba2.training.module import param_groups

    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    g = torch.Generator().manual_seed(11)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, 256, (4, 25), generator=g).chunk(dp)[dp_rank]
        loss = model.loss(rows[:, :-1], rows[:, 1:])
        loss.backward()
        sync_replicated_grads(model)
        if dp == 1 and getattr(model, "tensor_parallel", None) is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # the reference: torch's own
        else:
            clip_grad_norm_(model, max_norm)
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if dp > 1:
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()  # equal shares on every rank
        losses.append(loss.item())
    return losses


def _four_ranks(rank, world, name, out):
    """Two layouts of 4 ranks in one launch: tp = 4 alone (ngroups 2: ranks {0, 1} hold group 0, {2, 3} group 1,
    the norm's sums and the B/C gradients per pair), then dp_shard × tp = 2 × 2 under FSDP2 training `name`."""
    from lit_mamba2.parallel import apply_fsdp

    _split(rank, world, ["pure, ngroups 2"], out + ".tp4")
    dims = ParallelDims.resolve(world, dp_shard=2, tp=2)
    mesh = dims.build_mesh("cpu")
    model = apply_fsdp(apply_tensor_parallel(build(name), mesh.world["tp"]), mesh.fsdp, param_dtype=None,
                       reduce_dtype=torch.float64)
    losses = train(model, dims.data_rank(rank), dims.dp)
    if rank == 0:
        torch.save(losses, out)


def test_tp4_and_fsdp_by_tp_2x2_equal_one_process(tmp_path):
    name = "hybrid, ngroups 1, all segments"
    run(4, _four_ranks, name, str(tmp_path / "out.pt"))
    check(torch.load(tmp_path / "out.pt.tp4"), ["pure, ngroups 2"])
    # (a wrong clipping norm, e.g. shared rows counted twice, moves it by ~1e-5)
    assert torch.load(tmp_path / "out.pt") == pytest.approx(train(build(name)), rel=1e-12)
