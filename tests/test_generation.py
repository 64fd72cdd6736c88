"""Generation against independent references: greedy decoding by full forward passes over the growing sequence
(no cache), each prompt of a padded batch run alone, and the sampling rules checked on hand-made logits."""

import json

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.cli import main
from lit_mamba2.generation import Decoder, generate, sample_next, stream
from lit_mamba2.model import Mamba2LMHeadModel


def make_model(preset, seed=0):
    torch.manual_seed(seed)
    model = Mamba2LMHeadModel(Mamba2Config.from_name(preset)).eval()
    with torch.no_grad():  # spread dt and decays so that the state matters over the whole prompt
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p))
    return model


@torch.no_grad()
def greedy_full_forward(model, prompt, n):
    seq = prompt.clone()
    for _ in range(n):
        nxt = model(seq)[:, -1, : model.config.vocab_size].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq


@pytest.mark.parametrize("preset,ring_conv", [("mamba2-test", True), ("mamba2-test", False),
                                              ("mamba2attn-test", True), ("mamba2attn-test", False)])
def test_cached_greedy_equals_full_forward_greedy(preset, ring_conv):
    model = make_model(preset)
    prompt = torch.randint(1, 256, (2, 19), generator=torch.Generator().manual_seed(3))  # > one SSD chunk (16)
    decoder = Decoder(model, 2, 19 + 14, cuda_graph=False, ring_conv=ring_conv)
    out = generate(model, prompt, 14, temperature=0, decoder=decoder)
    assert torch.equal(out, greedy_full_forward(model, prompt, 14))


@pytest.mark.parametrize("preset", ["mamba2-test", "mamba2attn-test"])
def test_each_row_of_a_padded_batch_equals_the_prompt_alone(preset):
    model = make_model(preset, seed=1)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (6, 21, 1, 12)]
    batched = generate(model, prompts, 10, temperature=0)
    for p, row in zip(prompts, batched):
        alone = greedy_full_forward(model, torch.tensor([p]), 10)[0, len(p):].tolist()
        assert row == alone
    # and the logits themselves, not only their argmax: the padding leaks nothing
    with torch.no_grad():
        from lit_mamba2.generation import pad_prompts

        ids, seq_idx, lengths, pads = pad_prompts(prompts, "cpu")
        dec = Decoder(model, len(prompts), ids.shape[1] + 4, cuda_graph=False)
        first = dec.prefill(ids, seq_idx, lengths, pads)
        second = dec.step(first[:, :256].argmax(-1))
        for i, p in enumerate(prompts):
            seq = torch.tensor([p + [int(first[i, :256].argmax())]])
            ref = model(seq)[0, -2:]
            torch.testing.assert_close(first[i], ref[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(second[i], ref[1], rtol=1e-4, atol=1e-4)


def test_stop_tokens_end_rows_and_pad_after():
    model = make_model("mamba2-test")
    prompts = [[5, 6, 7], [9]]
    free = generate(model, prompts, 8, temperature=0)
    k = next(k for k in range(1, 8) if free[0][k] not in free[0][:k])  # a token row 0 has not made before
    stop = free[0][k]  # becomes a stop token
    out = generate(model, prompts, 8, temperature=0, stop_tokens=[stop])
    assert out[0] == free[0][:k + 1]
    cut = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert out[1] == free[1][:cut]
    toks = list(stream(model, [[5, 6, 7]], 8, temperature=0, stop_tokens=[stop], pad_id=0))
    assert len(toks) == k + 1  # streaming ends as soon as every row has stopped


def test_streaming_yields_max_new_tokens_one_at_a_time():
    model = make_model("mamba2-test")
    got = [t.tolist() for t in stream(model, torch.tensor([[1, 2, 3]]), 5, temperature=0)]
    assert len(got) == 5 and all(len(t) == 1 for t in got)


def test_sampling_rules_on_hand_made_logits():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits[:1], temperature=0).item() == 1
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {1, 2}
    # top_p: softmax = [.02, .47, .43, .01, .06]: the smallest prefix reaching 0.5 is {1, 2}
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {1, 2}
    assert set(sample_next(logits, top_p=0.3, generator=g).tolist()) == {1}
    freq = torch.bincount(sample_next(logits, temperature=1.0, generator=g), minlength=5).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
    cold = torch.bincount(sample_next(logits, temperature=0.05, generator=g), minlength=5)
    assert cold[1] > 3500  # low temperature concentrates on the argmax


def test_seeded_sampling_is_reproducible_and_batched_like_alone():
    model = make_model("mamba2attn-test")
    kw = dict(temperature=0.8, top_k=20, top_p=0.9)
    a = generate(model, [[3, 4, 5]], 6, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, [[3, 4, 5]], 6, generator=torch.Generator().manual_seed(7), **kw)
    assert a == b


def test_generate_verb_end_to_end(tmp_path, capsys, word_tokenizer):
    hf_tok = word_tokenizer
    model = make_model("mamba2-test")
    model.save_pretrained(tmp_path, format="mamba_ssm", tokenizer=hf_tok)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "w1 w2 w3", "--max_new_tokens", "5",
                 "--temperature", "0", "--stop", "#255"]) == 0
    out = capsys.readouterr().out
    ids = hf_tok.encode("w1 w2 w3", add_special_tokens=False)
    want = generate(model, [ids], 5, temperature=0, stop_tokens=[255])[0]
    assert out.strip() == "w1 w2 w3" + hf_tok.decode(want)
    # a batch of prompts, and --help
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "w1", "--prompt", "w4 w5 w6",
                 "--max_new_tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.count("--- ") == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    assert main(["generate", "--checkpoint", str(tmp_path / "absent"), "--prompt", "w1"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    # the row pipeline asked for on a model it cannot run (two norm groups): a clear error, not a traceback
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "w1", "--row_groups", "3"]) == 2
    assert "--row_groups: layer 0: the gated norm cannot fold" in capsys.readouterr().err


def test_generation_arguments_are_checked():
    model = make_model("mamba2-test")
    prompts = [[1, 2, 3], [4, 5]]
    assert generate(model, prompts, 0) == [[], []]  # nothing new, no error
    t = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, t, 0), t)
    for kwargs, match in [(dict(max_new_tokens=-1), "max_new_tokens must be a non-negative integer"),
                          (dict(temperature=-1.0), "temperature must be >= 0"),
                          (dict(top_p=-1.0), r"top_p must lie in \(0, 1\]"), (dict(top_p=1.5), "top_p"),
                          (dict(top_k=0), "top_k must be a positive integer")]:
        args = {"max_new_tokens": 2, **kwargs}
        with pytest.raises(ValueError, match=match):
            generate(model, prompts, **args)
    with pytest.raises(ValueError, match="wrap a single prompt"):
        generate(model, [1, 2, 3], 2)
    with pytest.raises(ValueError, match="integer token ids"):
        generate(model, [[1.5, 2.0]], 2)
