"""Evaluation while training (lit_mamba2.evals.callback), offline: a tiny model learns a corpus of alphabet runs
("klmnop...", wrapping after z) written here, and two lm-eval tasks written here score it: a multiple-choice task
(which 3-letter run continues a 4-letter context; the wrong choices are runs of the alphabet too, so only the
context tells them apart: chance is 1/4) and a loglikelihood task (perplexity of the true continuation).

Every logged number is checked against lm-eval's own simple_evaluate run afresh on the checkpoint the run wrote
(read from disk), on one process and under FSDP2 on two (every rank in lockstep)."""

import csv
import json
import math
import os
import random
import string
import sys

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

import lit_mamba2.evals.harness  # noqa: E402,F401  (registers the model "lit_mamba2")

from lit_mamba2 import Mamba2Config  # noqa: E402
from lit_mamba2.evals.callback import EvalCallback, EvalConfig, flat_metrics  # noqa: E402
from lit_mamba2.model import Mamba2LMHeadModel  # noqa: E402
from lit_mamba2.tokenizers import ByteTokenizer  # noqa: E402
from lit_mamba2.training.data import DataConfig  # noqa: E402
from lit_mamba2.training.module import OptimConfig  # noqa: E402
from lit_mamba2.training.pretrain import (ModelArgs, PretrainConfig, SampleConfig, TrainerConfig,  # noqa: E402
                                          pretrain)

ALPHABET = string.ascii_lowercase
TASKS = ["alpha_mc", "alpha_next"]
STEPS, EVERY, LIMIT = 16, 8, 24


def run_of(start, n):
    return "".join(ALPHABET[(start + i) % 26] for i in range(n))


@pytest.fixture(scope="module")
def alphabet(tmp_path_factory):
    """The corpus (one text file) and the two tasks (YAML + JSONL)."""
    root = tmp_path_factory.mktemp("alphabet")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    (root / "corpus" / "runs.txt").write_text(
        "\n".join(run_of(rng.randrange(26), rng.randrange(20, 60)) for _ in range(2000)) + "\n")
    docs = []
    for _ in range(LIMIT):
        start = rng.randrange(26)
        right = run_of(start + 4, 3)
        choices = [right, *[run_of(start + 4 + k, 3) for k in rng.sample(range(2, 25), 3)]]
        rng.shuffle(choices)
        docs.append({"context": run_of(start, 4), "choices": choices, "label": choices.index(right), "next": right})
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "alpha.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'alpha.jsonl'}
test_split: test
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
"""
    (tasks / "alpha_mc.yaml").write_text(f"""task: alpha_mc
{common}output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (tasks / "alpha_next.yaml").write_text(f"""task: alpha_next
{common}output_type: loglikelihood
doc_to_target: "{{{{next}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
""")
    return root


def recipe(root, out, **trainer):
    return PretrainConfig(
        model=ModelArgs("mamba2-test"),
        data=DataConfig(paths=[str(root / "corpus")], include="*.txt", exclude=[], seq_len=64, batch_size=8,
                        val_fraction=0.05, cache_dir=str(root / "cache")),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        trainer=TrainerConfig(max_steps=STEPS, accelerator="cpu", val_every_n_steps=STEPS, limit_val_batches=1,
                              save_every_n_steps=STEPS, log_every_n_steps=4, out_dir=str(out), progress_bar=False,
                              **trainer),
        sample=SampleConfig(max_new_tokens=0),
        eval=EvalConfig(tasks=TASKS, include_path=str(root / "tasks"), every_n_steps=EVERY, limit=LIMIT,
                        batch_size=LIMIT * 4))


def logged_evals(out, version=0):
    """{step: {metric: value}} of the eval/ columns of metrics.csv."""
    rows = list(csv.DictReader(open(out / "logs" / f"version_{version}" / "metrics.csv")))
    found = {}
    for r in rows:
        values = {k: float(v) for k, v in r.items() if k.startswith("eval/") and v}
        if values:
            found.setdefault(int(r["step"]), {}).update(values)
    return found


def evaluate_checkpoint(root, pretrained):
    """lm-eval's simple_evaluate on our model read from `pretrained` (a path), as a user runs it."""
    out = lm_eval.simple_evaluate(
        model="lit_mamba2", model_args=f"pretrained={pretrained},device=cpu,dtype=float32",
        tasks=TASKS, limit=LIMIT, batch_size=LIMIT * 4, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False))
    return flat_metrics(out["results"])


@pytest.fixture(scope="module")
def trained(alphabet, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    summary = pretrain(recipe(alphabet, out))
    return out, summary


def test_eval_callback_logs_lm_eval_metrics_while_training(alphabet, trained):
    out, summary = trained
    logged = logged_evals(out)
    assert sorted(logged) == [EVERY, STEPS]
    assert set(logged[STEPS]) == {"eval/alpha_mc/acc", "eval/alpha_next/perplexity"}
    # the last evaluation scored the final weights: lm-eval on the checkpoint read back gives the same numbers
    want = evaluate_checkpoint(alphabet, out / "checkpoints" / "last.ckpt")
    assert logged[STEPS]["eval/alpha_mc/acc"] == want["eval/alpha_mc/acc"]
    assert logged[STEPS]["eval/alpha_next/perplexity"] == pytest.approx(want["eval/alpha_next/perplexity"],
                                                                        rel=1e-4)
    # and the model learned between the two evaluations
    assert logged[STEPS]["eval/alpha_next/perplexity"] < logged[EVERY]["eval/alpha_next/perplexity"]


def test_a_trained_model_scores_above_chance(alphabet, trained):
    out, _ = trained
    trained_scores = evaluate_checkpoint(alphabet, out / "checkpoints" / "last.ckpt")
    torch.manual_seed(0)
    untrained = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).train()
    cb = EvalCallback(EvalConfig(tasks=TASKS, include_path=str(alphabet / "tasks"), limit=LIMIT,
                                 batch_size=LIMIT * 4))
    rng = torch.get_rng_state()
    before = cb.evaluate(untrained, ByteTokenizer(), "cpu")
    assert torch.equal(torch.get_rng_state(), rng) and untrained.training  # training's state is left as it was
    chance = 0.25  # four choices, all of them alphabet runs
    # (one random model on 24 documents lands anywhere near chance: 0.46 is 2.4 standard deviations above it)
    assert before["eval/alpha_mc/acc"] < 0.6
    assert trained_scores["eval/alpha_mc/acc"] >= 0.9 > chance + 0.5
    assert trained_scores["eval/alpha_mc/acc"] >= before["eval/alpha_mc/acc"] + 0.3
    # the true continuation: near-uniform over 256 bytes before (3 bytes: ppl ~ 256), near-certain after
    assert before["eval/alpha_next/perplexity"] > 100 and trained_scores["eval/alpha_next/perplexity"] < 10


def test_eval_and_push_callbacks_under_fsdp(alphabet, tmp_path, fake_hub):
    """torchrun, 2 ranks, trainer.strategy fsdp: both ranks take part in every sharded forward; rank 0 logs what
    lm-eval finds on the checkpoint read back in this one process. The hub: section pushes the model gathered whole
    (every checkpoint to a branch, the final model to main, its card holding the last evaluation) to a Hub served
    here."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "fsdp"
    args = ["--model.name", "mamba2-test", "--data.paths", f"[{alphabet / 'corpus'}]", "--data.include", "*.txt",
            "--data.exclude", "[]", "--data.seq_len", "64", "--data.batch_size", "4", "--data.val_fraction", "0.05",
            "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", "--trainer.val_every_n_steps", "2", "--trainer.limit_val_batches",
            "1", "--trainer.save_every_n_steps", "2", "--trainer.progress_bar", "false", "--trainer.out_dir",
            str(out), "--sample.max_new_tokens", "0", "--trainer.strategy", "fsdp", "--eval.tasks",
            ",".join(TASKS), "--eval.include_path", str(alphabet / "tasks"), "--eval.every_n_steps", "2",
            "--eval.limit", "8", "--eval.batch_size", "8", "--hub.repo_id", "tester/fsdp",
            "--hub.checkpoints_branch", "checkpoints"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "lit_mamba2", "pretrain", *args], cwd=os.getcwd(), capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = logged_evals(out)
    assert list(logged) == [2]
    want = lm_eval.simple_evaluate(
        model="lit_mamba2", model_args=f"pretrained={out / 'checkpoints' / 'last.ckpt'},device=cpu,dtype=float32",
        tasks=TASKS, limit=8, batch_size=8, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(alphabet / "tasks"), include_defaults=False))
    want = flat_metrics(want["results"])
    assert logged[2]["eval/alpha_mc/acc"] == want["eval/alpha_mc/acc"]
    assert math.isclose(logged[2]["eval/alpha_next/perplexity"], want["eval/alpha_next/perplexity"], rel_tol=1e-4)

    # pushed: the checkpoint at step 2 to its branch, then the final model (the same weights) to main
    from huggingface_hub import ModelCard

    from lit_mamba2.checkpoints import load

    repo = fake_hub.repos["tester/fsdp"]
    assert [(c["branch"], c["summary"]) for c in repo.commits] == [("checkpoints", "step 2"),
                                                                  ("main", "Trained model, step 2")]
    ckpt = load(Mamba2LMHeadModel, out / "checkpoints" / "last.ckpt").model
    ids = torch.randint(0, 256, (2, 16))
    for branch in ("checkpoints", "main"):
        folder = tmp_path / branch
        for name, data in repo.branches[branch].items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        torch.testing.assert_close(load(Mamba2LMHeadModel, folder, tokenizer="byte").model(ids), ckpt(ids))
    card = ModelCard(repo.branches["main"]["README.md"].decode())
    scores = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert scores == {("alpha_mc", "acc"): logged[2]["eval/alpha_mc/acc"],
                      ("alpha_next", "perplexity"): pytest.approx(logged[2]["eval/alpha_next/perplexity"])}
    assert "data:\n  kind: text" in card.text and "for 2 optimizer steps" in card.text  # the recipe
