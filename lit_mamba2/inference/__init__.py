"""The decode engine: the step with its device specialisations (step.py), the row pipeline (pipeline.py) and the
Decoder with CUDA graphs (decoder.py), all built from an explicit view of the model's weights (weights.py)."""

from lit_mamba2.inference.decoder import Decoder
from lit_mamba2.inference.pipeline import unsupported_reason as pipeline_unsupported_reason
from lit_mamba2.inference.weights import ModelWeights

__all__ = ["Decoder", "ModelWeights", "pipeline_unsupported_reason"]
