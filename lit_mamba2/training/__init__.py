"""Lightning training: the LightningModule, DataModules and callbacks (tokenizers: lit_mamba2.tokenizers)."""
