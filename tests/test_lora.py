"""LoRA (lit_mamba2.lora) against independent references: a model whose weights the test itself sets to
W + (alpha/r) B A, transformers' Mamba2ForCausalLM with PEFT's own LoRA loaded from the adapter we write, and the
training rule that only adapters move."""

import pytest
import torch
import torch.nn as nn

from lit_mamba2 import Mamba2Config
from lit_mamba2.generation import generate
from lit_mamba2.inference import Decoder, ModelWeights
from lit_mamba2.lora import (LoRAConfig, LoRALinear, adapters_of, apply_lora, lora_layers, merge_lora,
                             merge_state_dict, peft_unsupported_reason, save_peft_adapter)
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.training.module import param_groups

ALL = ["in_proj", "out_proj", "fc1", "fc2"]


def base_model(preset="mamba2attn-test", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = Mamba2LMHeadModel(Mamba2Config.from_name(preset)).to(dtype).eval()
    with torch.no_grad():  # norms and D away from 1, so that every layer's input is a general one
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.uniform_(0.5, 1.5)
    return model


def randomise_adapters(model, seed=1, only=None):
    """lora_B starts at zero (the adapted model starts as the base); give every adapter (or only `only`) a
    nonzero update, and the others none."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=layer.lora_A.dtype) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype) * 0.3)
            if only is not None and name != only:
                layer.lora_B.zero_()
    return model


def by_hand(adapted, base, cfg: LoRAConfig):
    """The base model with each adapted weight replaced by W + (alpha/r) B A, computed here."""
    ref = base_model_copy(base)
    with torch.no_grad():
        for name, layer in lora_layers(adapted).items():
            ref.get_submodule(name).weight += cfg.alpha / cfg.rank * layer.lora_B @ layer.lora_A
    return ref


def base_model_copy(model):
    import copy

    return copy.deepcopy(model)


def ids(vocab=256, b=2, L=21, seed=3):
    return torch.randint(0, vocab, (b, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["mamba2-test", "mamba2attn-test"])
def test_adapted_model_equals_weights_with_the_update_on_every_path(preset):
    """forward, the loss (a separate entry point) and the one-token step all see each adapter, as the same
    function as a model whose weight holds the update."""
    base = base_model(preset)
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=ALL if preset.startswith("mamba2attn") else ["in_proj", "out_proj"])
    adapted = base_model_copy(base)
    names = apply_lora(adapted, cfg)
    expected = {f"backbone.layers.{i}.{kind}" for i, layer in enumerate(base.backbone.layers)
                for kind in ("mixer.in_proj", "mixer.out_proj", *(("mlp.fc1", "mlp.fc2") if layer.mlp else ()))}
    assert set(names) == expected
    randomise_adapters(adapted)
    ref = by_hand(adapted, base, cfg)
    x, seq_idx = ids(), torch.tensor([[0] * 9 + [1] * 12, [0] * 21], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, seq_idx=seq_idx), ref(x, seq_idx=seq_idx), rtol=0, atol=1e-10)
        torch.testing.assert_close(adapted.loss(x[:, :-1], x[:, 1:]), ref.loss(x[:, :-1], x[:, 1:]), rtol=0,
                                   atol=1e-12)
        states_a, states_r = adapted.allocate_states(2), ref.allocate_states(2)
        adapted(x[:, :5], states=states_a), ref(x[:, :5], states=states_r)
        torch.testing.assert_close(adapted.step(x[:, 5], states_a), ref.step(x[:, 5], states_r), rtol=0, atol=1e-10)
        assert (adapted(x) - base(x)).abs().max() > 1e-3


def test_each_targeted_layer_changes_the_output():
    """One adapter at a time: each one alone moves the logits (no targeted layer is skipped on any path)."""
    base = base_model()
    adapted = base_model_copy(base)
    names = apply_lora(adapted, LoRAConfig(rank=2, targets=ALL))
    x = ids(L=8)
    with torch.no_grad():
        want = base(x)
        for name in names:
            randomise_adapters(adapted, only=name)
            assert (adapted(x) - want).abs().max() > 1e-4, name
            states = adapted.allocate_states(2)
            adapted(x[:, :4], states=states)
            assert (adapted.step(x[:, 4], states) - want[:, 4]).abs().max() > 1e-4, name


def test_fresh_adapters_leave_the_model_unchanged_and_only_adapters_train():
    base = base_model(dtype=torch.float32)
    model = base_model_copy(base).train()
    apply_lora(model, LoRAConfig(rank=4, targets=ALL))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    for _ in range(3):
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"{n} changed"
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_merged_model_equals_the_adapted_one_and_decodes():
    base = base_model()
    cfg = LoRAConfig(rank=4, alpha=4.0, targets=ALL)
    adapted = base_model_copy(base)
    apply_lora(adapted, cfg)
    randomise_adapters(adapted)
    merged = merge_lora(base_model_copy(adapted))
    assert not lora_layers(merged) and all(type(m) is nn.Linear for n, m in merged.named_modules()
                                           if n.endswith(("proj", "fc1", "fc2")))
    assert set(merged.state_dict()) == set(base.state_dict())
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), rtol=0, atol=1e-10)
        torch.testing.assert_close(merged(x), by_hand(adapted, base, cfg)(x), rtol=0, atol=1e-10)
    # a state dict with adapters (a LoRA training checkpoint's) merges to the same weights
    sd = merge_state_dict(adapted.state_dict(), cfg.scaling)
    assert set(sd) == set(merged.state_dict())
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-12, msg=k)
    # the decode engine reads weights directly: refused with adapters, right once merged
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.in_proj is a LoRALinear.*merge_lora"):
        ModelWeights.of(adapted)
    with pytest.raises(ValueError, match="LoRALinear"):
        generate(adapted, x[:, :6], 3, temperature=0)
    with torch.no_grad():
        out = generate(merged, x[:1, :6], 4, temperature=0, cuda_graph=False)
        seq = x[:1, :6]
        for _ in range(4):  # greedy decoding by full forward passes of the adapted model
            seq = torch.cat([seq, adapted(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_targets_are_checked():
    with pytest.raises(ValueError, match="lora.targets: 'lm_head' is not a linear layer that takes an adapter"):
        LoRAConfig(targets=["lm_head"])
    with pytest.raises(ValueError, match=r"lora.targets: this model has no 'fc1' layer \(its linear layers: "
                                         r"in_proj, out_proj\)"):
        apply_lora(base_model("mamba2-test"), LoRAConfig(targets=["in_proj", "fc1"]))
    with pytest.raises(ValueError, match="lora.rank must be a positive integer"):
        LoRAConfig(rank=0)


def test_peft_round_trip(tmp_path):
    """Adapters on in_proj written in PEFT's format: PEFT's own LoRA on transformers' Mamba2ForCausalLM, built
    from the same base weights (written in transformers' format by our checkpoints code), gives our logits."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import Mamba2ForCausalLM

    base = base_model("mamba2-test", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base-hf", format="hf")
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=["in_proj"])
    adapted = base_model_copy(base)
    apply_lora(adapted, cfg)
    randomise_adapters(adapted)
    assert peft_unsupported_reason(base.config, list(lora_layers(adapted))) is None
    save_peft_adapter(tmp_path / "adapter", adapters_of(adapted.state_dict()), cfg.rank, cfg.alpha,
                      base_model=str(tmp_path / "base-hf"))
    theirs = peft.PeftModel.from_pretrained(Mamba2ForCausalLM.from_pretrained(tmp_path / "base-hf"),
                                            tmp_path / "adapter").eval()
    x = ids(vocab=base.config.vocab_size)
    with torch.no_grad():
        want = adapted(x)
        got = theirs(x).logits
        plain = Mamba2ForCausalLM.from_pretrained(tmp_path / "base-hf").eval()(x).logits
    assert (got - want).abs().max() < 1e-4
    assert (plain - want).abs().max() > 1e-2  # the adapter is what makes them equal


def test_peft_refuses_what_peft_refuses():
    base = base_model("mamba2-test")
    assert "out_proj" in peft_unsupported_reason(base.config, ["backbone.layers.0.mixer.out_proj"])
    hybrid = base_model("mamba2attn-test")
    assert "attention layers" in peft_unsupported_reason(hybrid.config, ["backbone.layers.0.mixer.in_proj"])
