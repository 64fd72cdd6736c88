"""FSDP2 over a device mesh (lit_mamba2.parallel) on several CPU processes (gloo): the model built part by part
and sharded starts from one process's weights, and trains with the same losses and gradients as one process with the
same global batch (gradients clipped by their global norm; with activation checkpointing too), for dp_shard 2 and 4
and dp_replicate × dp_shard 2 × 2; float32 scalars under a bf16 policy; layouts that do not fit the world size are
named."""

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.parallel import LayoutError, ParallelDims, ShardingPolicy, apply_fsdp, build_model
from lit_mamba2.training.module import param_groups

from .gloo import run

PRESET, STEPS, BATCH, SEQ = "mamba2attn-test", 3, 8, 24
CLIP = 0.05  # below the gradients' global norm: every step is clipped


def batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def build():
    torch.manual_seed(0)
    return Mamba2LMHeadModel(Mamba2Config.from_name(PRESET))


def train(model, rows, dp_rank=0, dp=1):
    """STEPS AdamW steps on the rows of this data-parallel rank; returns the global losses and the first step's
    gradients (whole tensors)."""
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    losses, grads = [], None
    for b in rows:
        mine = b.chunk(dp)[dp_rank]
        loss = model.loss(mine[:, :-1], mine[:, 1:])
        loss.backward()
        if grads is None:
            grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # as Lightning's gradient_clip_val
        assert _full(norm) > 2 * CLIP
        opt.step()
        opt.zero_grad()
        losses.append(_mean_over_dp(loss.detach(), dp))
    return losses, grads


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _mean_over_dp(loss, dp):
    if dp == 1:
        return loss.item()
    import torch.distributed as dist

    loss = loss.clone()
    dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()  # every rank holds dp_rank's equal-sized share


def _sharded(rank, world, replicate, checkpointing, out):
    dims = ParallelDims.resolve(world, dp_replicate=replicate, dp_shard=-1)
    torch.manual_seed(0)  # build()'s seed: the part-by-part build must draw the same weights
    model = build_model(Mamba2Config.from_name(PRESET), dims.build_mesh("cpu").fsdp, ShardingPolicy(param_dtype=None),
                        activation_checkpointing=checkpointing)
    start = {n: _full(p).detach().clone() for n, p in model.named_parameters()}
    losses, grads = train(model, batches(), dims.data_rank(rank), dims.dp)
    if rank == 0:
        torch.save((start, losses, grads), out)


@pytest.mark.parametrize("world,replicate,checkpointing", [(2, 1, False), (4, 1, True), (4, 2, False)])
def test_sharded_training_equals_one_process(tmp_path, world, replicate, checkpointing):
    reference = build()
    ref_start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    ref_losses, ref_grads = train(reference, batches())
    run(world, _sharded, replicate, checkpointing, str(tmp_path / "out.pt"))
    start, losses, grads = torch.load(tmp_path / "out.pt")
    assert start.keys() == ref_start.keys()
    for n in start:  # the same start, although no rank built the model whole
        assert torch.equal(start[n], ref_start[n]), n
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:  # the gradients, not only the loss: a sum where a mean is due would show here
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _dtypes(rank, world, out):
    model = apply_fsdp(build(), ParallelDims.resolve(world).build_mesh("cpu").fsdp, param_dtype=torch.bfloat16)
    seen = {}
    mixer = model.backbone.layers[0].mixer

    def hook(module, args):
        seen.update(A_log=module.A_log.dtype, D=module.D.dtype, dt_bias=module.dt_bias.dtype,
                    norm=module.norm.weight.dtype, conv=module.conv1d.weight.dtype)

    def linear_hook(module, args):
        seen[module.name] = module.weight.dtype


    mixer.register_forward_pre_hook(hook)
    for name in ("in_proj", "out_proj"):  # gathered when called
        getattr(mixer, name).name = name
        getattr(mixer, name).register_forward_pre_hook(linear_hook)
    ids = torch.randint(0, 256, (2, 9))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    if rank == 0:
        torch.save((seen, {n: p.dtype for n, p in model.named_parameters()}), out)


def test_bf16_policy_keeps_the_ssm_scalars_and_norms_in_float32(tmp_path):
    run(2, _dtypes, str(tmp_path / "out.pt"))
    seen, stored = torch.load(tmp_path / "out.pt")
    assert seen == dict(A_log=torch.float32, D=torch.float32, dt_bias=torch.float32, norm=torch.float32,
                        conv=torch.float32, in_proj=torch.bfloat16, out_proj=torch.bfloat16)
    assert set(stored.values()) == {torch.float32}  # the sharded parameters the optimizer updates


def test_layouts_that_do_not_fit_are_named():
    assert ParallelDims.resolve(8, dp_replicate=2, dp_shard=-1) == ParallelDims(2, 4, 1, 1)
    assert ParallelDims.resolve(8, dp_shard=2, cp=2, tp=2).describe() == \
        "parallel layout: dp_replicate=1 dp_shard=2 cp=2 tp=2 (world 8)"
    with pytest.raises(LayoutError, match=r"dp_replicate=1 × dp_shard=3 × cp=1 × tp=1 = 3 ranks, but the world "
                                          r"size is 4"):
        ParallelDims.resolve(4, dp_shard=3)
    with pytest.raises(LayoutError, match="does not divide the world size 4"):
        ParallelDims.resolve(4, dp_shard=-1, tp=3)
    with pytest.raises(LayoutError, match="parallel.cp must be a positive integer or -1"):
        ParallelDims.resolve(4, cp=0)
    with pytest.raises(LayoutError, match="only one parallel degree may be -1"):
        ParallelDims.resolve(4, dp_shard=-1, tp=-1)
    assert [ParallelDims(1, 2, 2, 2).data_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
