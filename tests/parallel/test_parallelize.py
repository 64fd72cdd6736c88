"""The model built for training (lit_mamba2.parallel.build_model): activation checkpointing and compiled blocks
train as the plain model does, keeping parameter names; mamba2-2.7b built sharded on 2 processes never exists
whole on one."""

import resource

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.parallel import ParallelDims, ShardingPolicy, build_model

from .gloo import run


def one_step(model, ids):
    """The loss, every gradient, the bytes autograd saved for backward and the calls of layer 0's in_proj."""
    saved, calls = [0], [0]
    model.backbone.layers[0].mixer.in_proj.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, saved[0], calls[0]


@pytest.mark.parametrize("compile", [False, "aot_eager"])
def test_checkpointed_and_compiled_blocks_train_as_the_plain_model(compile):
    cfg = Mamba2Config.from_name("mamba2attn-test")
    ids = torch.randint(0, 256, (2, 49), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    loss, grads, saved, calls = one_step(Mamba2LMHeadModel(cfg), ids)
    torch.manual_seed(0)
    model = build_model(cfg, activation_checkpointing=True, compile=compile)
    loss_ac, grads_ac, saved_ac, calls_ac = one_step(model, ids)
    assert list(grads_ac) == list(grads)  # the names stay (no wrapper module)
    torch.testing.assert_close(loss_ac, loss, rtol=1e-6, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_ac[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
    assert saved_ac < saved / 4  # what the blocks kept for backward is gone (the loss head's remains)
    if compile:  # (the hook ran once, when dynamo traced it: calls say nothing here)
        assert all(block._compiled_call_impl is not None for block in model.backbone.layers)
    else:
        assert calls == 1 and calls_ac == 2  # recomputed in backward


def _build_big(rank, world, out):
    dims = ParallelDims.resolve(world)
    model = build_model(Mamba2Config.from_name("mamba2-2.7b"), dims.build_mesh("cpu").fsdp,
                        ShardingPolicy(param_dtype=None))
    local = sum(p.to_local().numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    torch.save((local, peak), f"{out}.{rank}")


def test_a_27b_model_built_sharded_never_exists_whole_on_a_rank(tmp_path):
    cfg = Mamba2Config.from_name("mamba2-2.7b")
    with torch.device("meta"):
        total = sum(p.numel() for p in Mamba2LMHeadModel(cfg).parameters())
    whole = total * 4  # float32
    run(2, _build_big, str(tmp_path / "out"))
    for rank in range(2):
        local, peak = torch.load(tmp_path / f"out.{rank}")
        assert abs(local - total / 2) < total / 100  # half the parameters each
        assert peak < 0.65 * whole, f"rank {rank}: peak {peak / 2**30:.1f} GiB, whole model {whole / 2**30:.1f} GiB"
