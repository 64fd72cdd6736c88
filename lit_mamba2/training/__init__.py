"""Lightning training: the LightningModule, DataModules, tokenizers and callbacks."""
