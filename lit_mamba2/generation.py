"""Text generation with the recurrent state cache: the prompt goes through the chunked SSD path once (prefill),
then one token at a time reuses each layer's conv/SSM state or KV cache."""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from lit_mamba2.model import Mamba2LMHeadModel


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits: (batch, vocab) -> (batch,) token ids. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream(model: Mamba2LMHeadModel, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, stop_tokens: tuple = (),
           generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """Yields each new token (batch,) as it is sampled. prompt_ids: (batch, prompt_len), all rows the same length."""
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    states = model.allocate_states(prompt_ids.shape[0], device=prompt_ids.device)
    logits = model(prompt_ids, states=states)[:, -1, : model.config.vocab_size]
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield token
        if stop_tokens:
            done |= torch.isin(token, torch.tensor(stop_tokens, device=token.device))
            if bool(done.all()):
                return
        logits = model(token[:, None], states=states)[:, -1, : model.config.vocab_size]


def generate(model: Mamba2LMHeadModel, prompt_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by up to max_new_tokens sampled tokens: (batch, prompt_len + new)."""
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    new = list(stream(model, prompt_ids, max_new_tokens, **kwargs))
    return torch.cat([prompt_ids, torch.stack(new, dim=1)], dim=1) if new else prompt_ids
