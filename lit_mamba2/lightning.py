"""lit-mamba2's pieces for your own Lightning code: one import path each.

    from lit_mamba2.lightning import LanguageModel, LMDataModule, FSDP2Strategy, TokenThroughput

Importing this module registers the strategy name "lit_mamba2_fsdp" in Lightning's registry, so that
`L.Trainer(strategy="lit_mamba2_fsdp")` works as well as `L.Trainer(strategy=FSDP2Strategy(dp_shard=...))`.
A batch is a dict of tensors: `input_ids` and `labels` (int64, (rows, seq_len), labels -100 where not counted),
optional `seq_idx` (int32, each position's document) and `positions`; see `check_batch`.
"""

from lit_mamba2.config import Mamba2Config
from lit_mamba2.evals.callback import EvalCallback, EvalConfig
from lit_mamba2.parallel.strategy import STRATEGY_NAME, FSDP2Strategy
from lit_mamba2.training.callbacks import CheckpointOnSigterm, PushToHub, TokenThroughput
from lit_mamba2.training.data import DataConfig, LMDataModule
from lit_mamba2.training.finetune_data import InstructionDataConfig, InstructionDataModule
from lit_mamba2.training.module import LanguageModel, OptimConfig, check_batch

TokenDataModule = LMDataModule  # (the name the plugin issue uses: the token, text and MQAR data in one module)

__all__ = ["Mamba2Config", "LanguageModel", "OptimConfig", "check_batch", "LMDataModule", "TokenDataModule",
           "DataConfig", "InstructionDataModule", "InstructionDataConfig", "FSDP2Strategy", "STRATEGY_NAME",
           "TokenThroughput", "CheckpointOnSigterm", "PushToHub", "EvalCallback", "EvalConfig"]
