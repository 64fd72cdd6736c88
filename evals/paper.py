"""The paper's zero-shot suite and its numbers per published checkpoint ("Transformers are SSMs", Dao & Gu 2024,
arXiv 2405.21060, Table 10; mamba2attn-2.7b from Table 3): what `lit-mamba2 evaluate` runs by default and prints
its results beside. Models trained on 300B tokens of the Pile with the GPT-NeoX tokenizer."""

# lm-eval task name -> the metric the Mamba papers report for it (LAMBADA's perplexity is reported too)
TASK_METRICS = {
    "lambada_openai": "acc",
    "hellaswag": "acc_norm",
    "piqa": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "openbookqa": "acc_norm",
}
TASKS = list(TASK_METRICS)

# accuracies in percent, in TASKS order; "avg" is the mean of the seven accuracies as the paper rounds it
_COLUMNS = ("pile_ppl", "lambada_openai_ppl", *TASKS, "avg")
_ROWS = {
    "mamba2-130m": (10.48, 16.86, 43.9, 35.3, 64.9, 47.4, 24.2, 52.1, 30.6, 42.6),
    "mamba2-370m": (8.21, 8.02, 55.8, 46.9, 70.5, 54.9, 26.9, 55.7, 32.4, 49.0),
    "mamba2-780m": (7.26, 5.86, 61.7, 54.9, 72.0, 61.0, 28.5, 60.2, 36.2, 53.5),
    "mamba2-1.3b": (6.66, 5.02, 65.7, 59.9, 73.2, 64.3, 33.3, 60.9, 37.8, 56.4),
    "mamba2-2.7b": (6.09, 4.10, 69.7, 66.6, 76.4, 69.6, 36.4, 64.0, 38.8, 60.2),
    "mamba2attn-2.7b": (5.95, 3.85, 71.1, 67.8, 75.8, 69.9, 37.8, 65.3, 39.0, 61.0),
}
PAPER_RESULTS = {name: dict(zip(_COLUMNS, row)) for name, row in _ROWS.items()}
