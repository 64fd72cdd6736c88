"""lit-mamba2: Mamba-2 and hybrid Mamba-2/attention language models, trained with PyTorch Lightning.

    from lit_mamba2 import Mamba2Config, Mamba2LMHeadModel, ssd, attention, generate

Importing the package loads torch and the model only: Triton loads when a kernel first runs, Lightning with the
training code.
"""

from lit_mamba2.config import ConfigError, Mamba2Config
from lit_mamba2.generation import generate
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.ops import attention, causal_conv1d, gated_rmsnorm, ssd

__version__ = "0.1.0"
__all__ = ["ConfigError", "Mamba2Config", "Mamba2LMHeadModel", "generate", "ssd", "causal_conv1d", "gated_rmsnorm",
           "attention", "__version__"]
