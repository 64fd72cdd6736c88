"""Instruction data (lit_mamba2.training.finetune_data): every malformed record named by file, line and field;
labels on response tokens only (checked against the responses' own tokens and against a direct log-likelihood
of them, loss and gradients); packed rows give each example the loss it has alone; over-long records counted."""

import json

import numpy as np
import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.tokenizers import HFTokenizer
from lit_mamba2.training.data import IGNORE_INDEX
from lit_mamba2.training.finetune_data import (InstructionDataConfig, InstructionDataModule, RecordError, examples,
                                               pack, read_records)


@pytest.fixture
def tok(word_tokenizer):
    return HFTokenizer.wrap(word_tokenizer)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def alpaca(i, n=3, with_input=True):
    words = [f"w{(i * 7 + k) % 40}" for k in range(n)]
    rec = {"instruction": "reverse " + " ".join(words), "output": " ".join(reversed(words))}
    if with_input:
        rec["input"] = f"w{i % 40}"
    return rec


def chat(i):
    return {"messages": [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": f"w{i % 40} w3"},
                         {"role": "assistant", "content": f"w{(i + 1) % 40}"}, {"role": "user", "content": "w4"},
                         {"role": "assistant", "content": f"w5 w{(i + 2) % 40}"}]}


GOOD = {"instruction": "w1", "output": "w2"}
MALFORMED = [
    ("not json", ['{"instruction": "w1", "output": }'], r"line 2: not valid JSON \(Expecting value, column 33\)"),
    ("not an object", [["w1", "w2"]], r"line 2: a record is a JSON object, got a list"),
    ("neither format", [{"prompt": "w1", "completion": "w2"}],
     r"line 2: neither an Alpaca record \(fields instruction, input, output\) nor a chat record \(field messages\); "
     r"its fields: \['completion', 'prompt'\]"),
    ("alpaca without output", [{"instruction": "w1", "input": "w2"}], r"line 2, field 'output': missing"),
    ("alpaca without instruction", [{"output": "w1"}], r"line 2, field 'instruction': missing"),
    ("alpaca output not text", [{"instruction": "w1", "output": 3}],
     r"line 2, field 'output': expected a string, got a number"),
    ("alpaca input not text", [{"instruction": "w1", "input": ["w2"], "output": "w3"}],
     r"line 2, field 'input': expected a string, got a list"),
    ("messages not a list", [{"messages": "w1"}],
     r"line 2, field 'messages': expected a non-empty list of \{role, content\} objects, got a string"),
    ("messages empty", [{"messages": []}], r"line 2, field 'messages': expected a non-empty list .* got an empty list"),
    ("message not an object", [{"messages": [{"role": "user", "content": "w1"}, "w2"]}],
     r"line 2, field 'messages\[1\]': expected an object with role and content, got a string"),
    ("message without role", [{"messages": [{"content": "w1"}]}], r"line 2, field 'messages\[0\].role': missing"),
    ("message without content", [{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant"}]}],
     r"line 2, field 'messages\[1\].content': missing"),
    ("unknown role", [{"messages": [{"role": "bot", "content": "w1"}]}],
     r"line 2, field 'messages\[0\].role': 'bot' is not one of system, user, assistant"),
    ("content not text", [{"messages": [{"role": "user", "content": None}]}],
     r"line 2, field 'messages\[0\].content': expected a string, got null"),
    ("no assistant message", [{"messages": [{"role": "user", "content": "w1"}]}],
     r"line 2, field 'messages': no assistant message \(nothing to train on\)"),
]


@pytest.mark.parametrize("records,message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_a_malformed_record_is_named_by_file_line_and_field(tmp_path, records, message):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, *records, GOOD])
    with pytest.raises(RecordError, match=f"^{str(path)}, {message}$"):
        read_records(path)


def test_a_json_file_names_the_line_its_bad_record_starts_on(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"instruction": "w1", "output": "w2"},\n  {"instruction": "w1",\n   "output": 7}\n]\n')
    with pytest.raises(RecordError, match=f"^{path}, line 3, field 'output': expected a string, got a number$"):
        read_records(path)
    path.write_text('{"instruction": "w1", "output": "w2"}\n')
    with pytest.raises(RecordError, match=rf"^{path}, line 1: a \.json file holds a list of records, got an object"):
        read_records(path)
    path.write_text('[\n  {"instruction": "w1", "output": "w2"}\n  {"instruction": "w1", "output": "w2"}\n]')
    with pytest.raises(RecordError, match=rf"^{path}, line 3: not valid JSON \(expected ',' or '\]'"):
        read_records(path)
    path.write_text('[{"instruction": "w1", "output": "w2"},\n {"instruction": "w3", "output": "w4"}]')
    assert [r.alpaca for r in read_records(path)] == [("w1", "", "w2"), ("w3", "", "w4")]


def response_tokens(tok, text):
    return tok.encode(text) + [tok.eos_id]


@pytest.mark.parametrize("template", ["builtin", "tokenizer"])
def test_labels_are_the_responses_and_their_eos_only(tmp_path, tok, template):
    """The labelled positions hold exactly each response's own tokens followed by eos, in order; the inputs hold
    the whole rendered conversation (prompt text included)."""
    if template == "tokenizer":  # a ChatML-like template, set here
        tok.hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
                                "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(1), alpaca(2, with_input=False), chat(3)])
    records = read_records(path)
    items, counts = examples(records, tok, 512, "truncate", use_chat_template=template == "tokenizer")
    assert counts.records == 3 and not counts.truncated and not counts.dropped
    responses = [[alpaca(1)["output"]], [alpaca(2)["output"]], ["w4", "w5 w5"]]
    for (inputs, labels), texts in zip(items, responses):
        want = [t for text in texts for t in response_tokens(tok, text)]
        assert labels[labels != IGNORE_INDEX].tolist() == want
        seq = np.concatenate([inputs, labels[-1:]])  # the example's tokens: inputs, then the last label
        for k in np.flatnonzero(labels != IGNORE_INDEX):
            assert seq[k + 1] == labels[k]  # a label is the next token
        assert labels[-1] == tok.eos_id
    # the prompt is in the inputs: the instruction's words and, for the chat, every earlier turn
    text = tok.decode(items[2][0].tolist())
    assert all(w in text for w in ("w1 w2", "w3 w3", "w4"))
    assert "reverse" not in tok.hf.get_vocab() and tok.decode(items[0][0].tolist()).count("w") >= 4


def direct_response_nll(model, tok, prompt_and_response: list[tuple[list[int], list[int]]]):
    """The summed negative log-likelihood of each response given its prompt, from a forward pass of the example
    alone and log_softmax, and the number of response tokens."""
    total, count = 0.0, 0
    for prompt, response in prompt_and_response:
        seq = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(seq)[0, :-1].double(), dim=-1)
        at = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
        total = total - logp[at, torch.tensor(response)].sum()
        count += len(response)
    return total, count


def split_example(inputs, labels):
    """An example's prompt and response tokens, read from its rows (the response: the labelled tail)."""
    seq = np.concatenate([inputs, labels[-1:]]).tolist()
    first = int(np.flatnonzero(labels != IGNORE_INDEX)[0]) + 1
    return seq[:first], seq[first:]


def test_prompt_tokens_contribute_nothing_to_the_loss_or_its_gradient(tmp_path, tok):
    """model.loss on a packed batch (what training computes) equals, with its gradients, the mean negative
    log-likelihood of the response tokens computed directly, each example alone."""
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test", vocab_size=48)).double()
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(i) for i in range(4)] + [alpaca(5, with_input=False)])
    items, _ = examples(read_records(path), tok, 64, "truncate", use_chat_template=False)
    rows = pack(items, 96, tok.eos_id)
    assert len(rows["input_ids"]) < len(items)  # several examples share a row
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    loss = model.loss(batch["input_ids"], batch["labels"], seq_idx=batch["seq_idx"])
    got = torch.autograd.grad(loss, list(model.parameters()))
    # the responses as the test sees them: Alpaca's output tokens and eos, after a prompt that ends with them
    pairs = [split_example(*x) for x in items]
    for (prompt, response), i in zip(pairs, [0, 1, 2, 3, 5]):
        assert response == response_tokens(tok, alpaca(i)["output"])
    total, count = direct_response_nll(model, tok, pairs)
    want_loss = total / count
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-10, atol=0)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-7, atol=1e-12, msg=name)
    # and the prompt tokens' own predictions are not in it: other prompts, same loss
    changed = batch["input_ids"].clone()
    prompt_pos = (batch["labels"] == IGNORE_INDEX)
    prompt_pos[:, :-1] &= batch["labels"][:, 1:] == IGNORE_INDEX  # positions whose next input is no response
    assert not torch.equal(loss, model.loss(changed.masked_fill(prompt_pos, 1), batch["labels"],
                                            seq_idx=batch["seq_idx"]))  # (the prompt is context: it matters)


def alone_nll(model, inputs, labels) -> float:
    """An example's summed loss on its labelled positions, from a forward pass of it alone."""
    logp = torch.log_softmax(model(torch.from_numpy(inputs)[None])[0].double(), dim=-1)
    at = torch.from_numpy(np.flatnonzero(labels != IGNORE_INDEX))
    return -logp[at, torch.from_numpy(labels)[at]].sum().item()


@pytest.mark.parametrize("preset", ["mamba2-test", "mamba2attn-test"])
def test_packed_examples_have_the_losses_they_have_alone(tmp_path, tok, preset):
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name(preset, vocab_size=48)).double().eval()
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(1, n=2), chat(3), chat(4), alpaca(2, n=4, with_input=False)])
    items, _ = examples(read_records(path), tok, 100, "truncate", use_chat_template=False)
    rows = pack(items, 100, tok.eos_id)
    with torch.no_grad():
        per_position = model.loss(torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["labels"]),
                                  seq_idx=torch.from_numpy(rows["seq_idx"]), reduction="none")
        packed = [per_position[r][torch.from_numpy(rows["seq_idx"][r] == k)].sum().item()
                  for r in range(len(per_position)) for k in range(int(rows["seq_idx"][r].max()))]
        alone = [alone_nll(model, *x) for x in items]
    assert len(packed) == len(items) and max(rows["seq_idx"].max(axis=1)) >= 2
    np.testing.assert_allclose(packed, alone, rtol=1e-9)


def test_overlong_records_are_truncated_or_dropped_and_counted(tmp_path, tok):
    long = {"instruction": " ".join(["w1"] * 30), "output": " ".join(["w2"] * 30)}
    prompt_only = {"instruction": " ".join(["w1"] * 80), "output": "w2"}
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(1), long, prompt_only])
    records = read_records(path)
    n_short = len(examples(records[:1], tok, 512, "drop", False)[0][0][0])
    items, counts = examples(records, tok, 64, "truncate", False)
    assert (counts.truncated, counts.dropped, len(items)) == (1, 1, 2)
    assert len(items[1][0]) == 64 and (items[1][1] != IGNORE_INDEX).any() and len(items[0][0]) == n_short
    items, counts = examples(records, tok, 64, "drop", False)
    assert (counts.truncated, counts.dropped, len(items)) == (0, 2, 1)
    assert "1 longer than seq_len 64 truncated, 1 dropped" in examples(records, tok, 64, "truncate", False)[1] \
        .describe(64, "truncate")


@pytest.mark.parametrize("packed", [True, False])
def test_datamodule_rows_and_validation_split(tmp_path, tok, packed):
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca(i) for i in range(40)])
    cfg = InstructionDataConfig(train=[str(path)], val_fraction=0.1, seq_len=160, batch_size=4, pack=packed)
    dm = InstructionDataModule(cfg, tok, max_steps=3, vocab_size=48, verbose=False)
    dm.setup()
    train, val = dm.train_set.arrays, dm.val_set.arrays
    n_train = int((train["labels"] == tok.eos_id).sum())  # one eos label per example
    n_val = int((val["labels"] == tok.eos_id).sum())
    assert (n_train, n_val) == (36, 4)
    assert train["input_ids"].shape[1] == 160
    if packed:
        assert len(dm.train_set) < 36 and "seq_idx" in train
    else:
        assert len(dm.train_set) == 36 and "seq_idx" not in train
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 160)
    assert "36 records" in dm.summary and "4 records" in dm.summary
    # the split is by record and seeded: the same records again, none in both
    dm2 = InstructionDataModule(cfg, tok, max_steps=3, vocab_size=48, verbose=False)
    dm2.setup()
    assert torch.equal(dm2.val_set.arrays["input_ids"], val["input_ids"])


def test_template_tokenizer_needs_one(tok):
    with pytest.raises(ValueError, match="data.template: tokenizer, but .* has no chat template"):
        InstructionDataModule(InstructionDataConfig(train=["x.jsonl"], template="tokenizer"), tok)
