"""lit-mamba2: Mamba-2 and hybrid Mamba-2/attention language models, trained with PyTorch Lightning."""

from lit_mamba2.config import ConfigError, Mamba2Config
from lit_mamba2.ops import causal_conv1d, gated_rmsnorm, ssd

__version__ = "0.1.0"
__all__ = ["ConfigError", "Mamba2Config", "ssd", "causal_conv1d", "gated_rmsnorm", "__version__"]
