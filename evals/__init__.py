"""Zero-shot evaluation and Hub publishing (installed as lit_mamba2.evals)."""
