"""The lm-eval backend (lit_mamba2.evals.harness) and `lit-mamba2 evaluate`, offline: a tiny random model saved
here, tasks from YAML files and JSONL data written here, run through lm-eval's own simple_evaluate. Every number is
checked against a direct computation with the model (log_softmax of full forward logits; greedy decoding by full
forwards)."""

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local JSONL files: nothing to fetch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lit_mamba2 import Mamba2Config  # noqa: E402
from lit_mamba2.cli import main  # noqa: E402
from lit_mamba2.evals.harness import LitMamba2LM  # noqa: E402
from lit_mamba2.model import Mamba2LMHeadModel  # noqa: E402
from lit_mamba2.tokenizers import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()


def make_model(seed=0):
    torch.manual_seed(seed)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).eval()
    with torch.no_grad():  # spread dt and decays so that the state matters over the whole row
        for name, p in model.named_parameters():
            if name.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p))
        # tied embeddings: rows of zeros never win the argmax, so greedy text is printable ASCII (and eos)
        keep = torch.zeros(model.config.padded_vocab_size, dtype=torch.bool)
        keep[0] = True
        keep[32:127] = True
        model.backbone.embedding.weight[~keep] = 0
    return model


@torch.no_grad()
def direct_loglikelihood(model, ctx, cont):
    """sum over the continuation of log_softmax(model(ctx + cont)) at the positions that predict it."""
    ids = torch.tensor([ctx + cont])
    lp = torch.log_softmax(model(ids)[0, :, : model.config.vocab_size].double(), dim=-1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    chosen = lp[pos, torch.tensor(cont)]
    return float(chosen.sum()), bool((lp[pos].argmax(-1) == torch.tensor(cont)).all())


@torch.no_grad()
def greedy_full_forward(model, prompt, n, eos=0):
    seq = list(prompt)
    new = []
    for _ in range(n):
        nxt = int(model(torch.tensor([seq]))[0, -1, : model.config.vocab_size].argmax())
        if nxt == eos:
            break
        seq.append(nxt)
        new.append(nxt)
    return new


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    model = make_model()
    model.save_pretrained(root / "hf", format="hf")  # model.safetensors; the byte tokenizer has no files
    # a training checkpoint holds its tokenizer
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "model_config": model.config.to_dict(), "tokenizer": {"kind": "byte"},
                "hyper_parameters": {"model_config": model.config.to_dict()}}, root / "last.ckpt")
    tasks = root / "tasks"
    tasks.mkdir()
    mc = [{"question": f"Q{i}: {a} or {b}?", "choices": [f" {a}", f" {b}", " neither"], "label": i % 3}
          for i, (a, b) in enumerate([("cat", "dog"), ("red", "blue"), ("up", "down"), ("sun", "moon")])]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    words = ["the cat sat on the mat", "a dog ran to the park", "she read the long book", "we ate bread"]
    (tasks / "lastword.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in words))
    (tasks / "toy_mc.yaml").write_text(f"""task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (tasks / "toy_lastword.yaml").write_text(f"""task: toy_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'lastword.jsonl'}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' ' + text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return {"root": root, "model": model, "tasks": tasks, "mc": mc, "words": words}


def test_simple_evaluate_numbers_equal_direct_computation(setup):
    model, root = setup["model"], setup["root"]
    out = lm_eval.simple_evaluate(
        model="lit_mamba2", model_args=f"pretrained={root / 'hf'},tokenizer=byte,dtype=float32,device=cpu,"
                                       "max_length=2048",
        tasks=["toy_mc", "toy_lastword"], batch_size=3,
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
        log_samples=True)
    # every loglikelihood lm-eval received is the direct one
    correct = []
    for sample in out["samples"]["toy_mc"]:
        lls = []
        for (ctx, cont), resp in zip([a.arguments if hasattr(a, "arguments") else a for a in sample["arguments"]],
                                     sample["resps"]):
            want, greedy = direct_loglikelihood(model, TOK.encode(ctx), TOK.encode(cont))
            got, got_greedy = float(resp[0][0]), resp[0][1]
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-4), (ctx, cont, got, want)
            assert got_greedy == greedy
            lls.append(want)
        correct.append(float(max(range(len(lls)), key=lambda i: lls[i]) == sample["target"]))
    assert math.isclose(out["results"]["toy_mc"]["acc,none"], sum(correct) / len(correct))
    lls, greedy_all = [], []
    for sample in out["samples"]["toy_lastword"]:
        ctx, cont = sample["arguments"][0]
        want, greedy = direct_loglikelihood(model, TOK.encode(ctx), TOK.encode(cont))
        assert math.isclose(float(sample["resps"][0][0][0]), want, rel_tol=1e-5, abs_tol=1e-4)
        lls.append(want)
        greedy_all.append(float(greedy))
    assert math.isclose(out["results"]["toy_lastword"]["perplexity,none"], math.exp(-sum(lls) / len(lls)),
                        rel_tol=1e-4)
    assert out["results"]["toy_lastword"]["acc,none"] == sum(greedy_all) / len(greedy_all)


def reqs(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_batching_truncation_greedy_and_empty_context(setup):
    model = setup["model"]
    pairs = [("the cat sat on", " the mat"), ("x", " y z"), ("a much longer context for the model", " here"),
             ("", "start"), ("ab", "c")]
    one = LitMamba2LM(model, tokenizer=TOK, device="cpu", batch_size=1)
    four = LitMamba2LM(model, tokenizer=TOK, device="cpu", batch_size=4)
    a = one.loglikelihood(reqs("loglikelihood", pairs), disable_tqdm=True)
    b = four.loglikelihood(reqs("loglikelihood", pairs), disable_tqdm=True)
    for (ctx, cont), (x, gx), (y, gy) in zip(pairs, a, b):
        ctx_ids = TOK.encode(ctx) if ctx else [TOK.eos_id]  # an empty context is eos
        want, greedy = direct_loglikelihood(model, ctx_ids, TOK.encode(cont))
        assert math.isclose(x, want, rel_tol=1e-5, abs_tol=1e-4) and math.isclose(y, want, rel_tol=1e-5,
                                                                                   abs_tol=1e-4)
        assert gx == gy == greedy
    # left truncation to max_length: the row keeps its last max_length tokens
    short = LitMamba2LM(model, tokenizer=TOK, device="cpu", batch_size=2, max_length=12)
    got = short.loglikelihood(reqs("loglikelihood", pairs[:3]), disable_tqdm=True)
    for (ctx, cont), (x, _) in zip(pairs[:3], got):
        row = (TOK.encode(ctx) + TOK.encode(cont))[-13:]
        n = len(TOK.encode(cont))
        want, _ = direct_loglikelihood(model, row[:-n], row[-n:])
        assert math.isclose(x, want, rel_tol=1e-5, abs_tol=1e-4)
    # is_greedy: the model's own greedy continuation is greedy; change one token and it is not
    ctx = TOK.encode("hello w")
    greedy = greedy_full_forward(model, ctx, 4, eos=-1)
    other = greedy[:-1] + [(greedy[-1] + 1) % 256 or 1]
    res = four._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)], disable_tqdm=True)
    assert res[0][1] is True and res[1][1] is False
    assert res[0][0] > res[1][0]
    # rolling: the whole text's log-likelihood after eos, in windows of max_length; equals one direct pass
    text = "rolling windows over a text longer than twelve"
    ids = TOK.encode(text)
    (roll,) = short.loglikelihood_rolling(reqs("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    want = 0.0
    for start in range(0, len(ids), 12):
        ctx_w = [TOK.eos_id] + ids[:start]
        piece = ids[start:start + 12]
        want += direct_loglikelihood(model, ctx_w[-(13 - len(piece)):], piece)[0]
    assert math.isclose(roll, want, rel_tol=1e-5, abs_tol=1e-4)
    (full,) = one.loglikelihood_rolling(reqs("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert math.isclose(full, direct_loglikelihood(model, [TOK.eos_id], ids)[0], rel_tol=1e-5, abs_tol=1e-4)


def test_generate_until_stops_at_the_stop_string_and_equals_greedy(setup):
    model = setup["model"]
    lm = LitMamba2LM(str(setup["root"] / "last.ckpt"), device="cpu", batch_size=3)  # the .ckpt's own tokenizer
    contexts = ["the cat", "a dog ran to", "x", "we ate bread and"]
    expected, args = [], []
    for c in contexts:
        new = greedy_full_forward(model, TOK.encode(c), 12)
        text = TOK.decode(new)
        # a stop string taken from the greedy text itself, so that generation must stop there
        stop = text[3:3 + 1 + len(expected) % 2] or "never"  # one or two characters
        expected.append(text.split(stop)[0])
        args.append((c, {"until": [stop], "max_gen_toks": 12, "do_sample": False}))
    got = lm.generate_until(reqs("generate_until", args), disable_tqdm=True)
    assert got == expected
    assert sum(len(e) for e in expected) > 0 and any(len(TOK.encode(e)) < 12 for e in expected)
    # no stop string: the whole greedy text (up to eos)
    got = lm.generate_until(reqs("generate_until", [(c, {"until": [], "max_gen_toks": 6}) for c in contexts]),
                            disable_tqdm=True)
    assert got == [TOK.decode(greedy_full_forward(model, TOK.encode(c), 6)) for c in contexts]


def test_evaluate_verb_writes_results_and_table(setup, tmp_path, capsys):
    root = setup["root"]
    out = tmp_path / "out"
    assert main(["evaluate", "--checkpoint", str(root / "last.ckpt"), "--tasks", "toy_mc,toy_lastword",
                 "--include_path", str(setup["tasks"]), "--output_path", str(out), "--batch_size", "2",
                 "--device", "cpu", "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert set(record["results"]) == {"toy_mc", "toy_lastword"}
    assert record["configs"]["toy_mc"]["dataset_path"] == "json"  # (the model card of push links the data)
    assert record["configs"]["toy_mc"]["output_type"] == "multiple_choice"
    table = (out / "results.md").read_text()
    assert "| toy_mc | acc |" in table and "| toy_lastword | perplexity |" in table
    assert "| toy_mc | acc |" in printed
    acc = record["results"]["toy_mc"]["acc,none"]
    assert f"| toy_mc | acc | {acc * 100:.1f} |" in table
    # mistakes are one line, before anything runs
    assert main(["evaluate", "--checkpoint", str(root / "last.ckpt"), "--tasks", "no_such_task",
                 "--include_path", str(setup["tasks"]), "--output_path", str(out)]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(root / "last.ckpt"), "--batch_sise", "2"]) == 2
    assert "did you mean --batch_size" in capsys.readouterr().err


def test_paper_table_matches_the_published_size():
    from lit_mamba2.evals.run import markdown_table, matching_paper_model

    assert matching_paper_model(Mamba2Config.from_name("mamba2-130m")) == "mamba2-130m"
    assert matching_paper_model(Mamba2Config.from_name("mamba2attn-2.7b")) == "mamba2attn-2.7b"
    assert matching_paper_model(Mamba2Config.from_name("mamba2-test")) is None
    results = {"lambada_openai": {"acc,none": 0.5, "acc_stderr,none": 0.01, "perplexity,none": 12.0,
                                  "perplexity_stderr,none": 0.5},
               "hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.36, "acc_norm_stderr,none": 0.004}}
    table = markdown_table(results, "mamba2-130m")
    assert "| lambada_openai | acc | 50.0 | 1.0 | 43.9 |" in table
    assert "| lambada_openai | perplexity | 12.00 | 0.50 | 16.86 |" in table
    assert "| hellaswag | acc_norm | 36.0 | 0.4 | 35.3 |" in table
    assert "| hellaswag | acc |" not in table


@pytest.mark.parametrize("fmt", ["mamba_ssm", "hf"])
def test_folder_with_its_own_hf_tokenizer(tmp_path, fmt, word_tokenizer):
    hf_tok = word_tokenizer
    model = make_model(1)
    model.save_pretrained(tmp_path, format=fmt, tokenizer=hf_tok)
    lm = lm_eval.api.registry.get_model("lit_mamba2").create_from_arg_string(
        f"pretrained={tmp_path},device=cpu,dtype=float32", {"batch_size": 2})
    pairs = [("w1 w2 w3", " w4"), ("w5", " w6 w7"), ("", "w8 w9")]
    got = lm.loglikelihood(reqs("loglikelihood", pairs), disable_tqdm=True)
    for (ctx, cont), (x, g) in zip(pairs, got):
        def enc(text):
            return hf_tok.encode(text, add_special_tokens=False)

        ctx_ids, cont_ids = enc(ctx) or [0], enc(ctx + cont)[len(enc(ctx)):]  # an empty context is eos
        want, greedy = direct_loglikelihood(model, ctx_ids, cont_ids)
        assert math.isclose(x, want, rel_tol=1e-5, abs_tol=1e-4) and g == greedy
