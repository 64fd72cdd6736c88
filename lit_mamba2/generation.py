"""Text generation with the recurrent state cache: sampling, prompts, `stream` / `generate` and the CLI verb.

The prompts go through the chunked path once (prefill: SSD and conv return their final states, attention its keys
and values); then each new token runs the decode engine's step (lit_mamba2.inference.Decoder), which advances
every layer's conv/SSM state or KV cache in place. Prompts of different lengths are left-padded and the padding is
its own document (seq_idx 0 before each row's prompt, 1 over it), so no pad token, conv tap or state reaches a
prompt; attention masks the padded KV slots while decoding.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional, Sequence, Union

import torch

from lit_mamba2.inference import Decoder
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.tokenizers import Tokenizer

Prompts = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[torch.Tensor]]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits: (batch, vocab) -> (batch,) token ids. temperature 0 is greedy; top_k keeps the k largest logits
    (and any tied with the k-th), top_p the smallest set of tokens whose probability reaches p."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be a positive integer or None (no limit), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")


def pad_prompts(prompts: Prompts, device, pad_id: int = 0):
    """Left-pad prompts into (batch, L) ids. Returns ids, seq_idx (int32, or None when no row is padded),
    lengths (batch,) and pads (batch,) as int64 tensors."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts[None] if prompts.dim() == 1 else prompts
        rows = list(prompts)
    else:
        if len(prompts) and not isinstance(prompts[0], (torch.Tensor, list, tuple)):
            raise ValueError("prompts must be a (batch, L) tensor or a list of prompts, each a list of token ids "
                             f"(got a list of {type(prompts[0]).__name__}: wrap a single prompt as [ids])")
        rows = [torch.as_tensor(p) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    if any(r.is_floating_point() or r.is_complex() or r.dim() != 1 for r in rows):
        raise ValueError("every prompt must be a 1-d sequence of integer token ids")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    if int(lengths.min()) == 0:
        raise ValueError(f"prompt {int(lengths.argmin())} is empty; every prompt needs at least one token")
    L = int(lengths.max())
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r.to(torch.long)
    pads = L - lengths
    seq_idx = None
    if int(pads.max()) > 0:
        seq_idx = (torch.arange(L)[None, :] >= pads[:, None]).to(torch.int32)
        seq_idx = seq_idx.to(device)
    return ids.to(device), seq_idx, lengths.to(device), pads.to(device)


@torch.inference_mode()
def stream(model: Mamba2LMHeadModel, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, stop_tokens: Sequence[int] = (),
           generator: Optional[torch.Generator] = None, pad_id: int = 0, cuda_graph: Optional[bool] = None,
           decoder: Optional[Decoder] = None, state_dtype: Optional[torch.dtype] = None,
           pdl: bool = True, row_groups: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Yields each new token (batch,) as it is sampled. prompts: (batch, L) ids, or a list of prompts of any
    lengths (left-padded here). Rows that produced a stop token yield pad_id afterwards; generation ends when every
    row has stopped or after max_new_tokens. cuda_graph, state_dtype, pdl, row_groups: the Decoder's (ignored with
    `decoder`)."""
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    device = model.lm_head.weight.device
    ids, seq_idx, lengths, pads = pad_prompts(prompts, device, pad_id)
    if max_new_tokens == 0:
        return
    b, L = ids.shape
    if decoder is None:
        decoder = Decoder(model, b, L + max_new_tokens, cuda_graph, state_dtype=state_dtype, pdl=pdl,
                          row_groups=row_groups)
    logits = decoder.prefill(ids, seq_idx, lengths, pads)
    vocab = model.config.vocab_size
    stops = torch.tensor(list(stop_tokens), device=device, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = sample_next(logits[:, :vocab], temperature, top_k, top_p, generator)
        if len(stops):
            token = torch.where(done, torch.full_like(token, pad_id), token)
        yield token
        if len(stops):
            done |= torch.isin(token, stops)
            if bool(done.all()):
                return
        if i + 1 < max_new_tokens:
            logits = decoder.step(token)


def generate(model: Mamba2LMHeadModel, prompts: Prompts, max_new_tokens: int, **kwargs):
    """A (batch, L) tensor of prompts: returns (batch, L + new) with the new tokens appended. A list of prompts:
    returns a list with each prompt's new tokens (up to and including its stop token)."""
    new = list(stream(model, prompts, max_new_tokens, **kwargs))
    if isinstance(prompts, torch.Tensor):
        prompts = prompts[None] if prompts.dim() == 1 else prompts
        return torch.cat([prompts, torch.stack(new, dim=1).to(prompts.device)], dim=1) if new else prompts
    out = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
    stops = set(kwargs.get("stop_tokens", ()))
    result = []
    for row in out:
        cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


# ---------------------------------------------------------------------------------------------------------------
# lit-mamba2 generate
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class GenerateConfig:
    """The options of `lit-mamba2 generate` (each prompt continued; a single prompt's tokens stream as they come).

    Args:
        checkpoint: checkpoint folder, Hub repo id or training .ckpt
        prompt: prompt text; repeat --prompt for a batch of prompts (one batch); each is taken as it is
        max_new_tokens: tokens to generate per prompt
        temperature: 0 is greedy
        top_k: sample among the k most likely tokens (default: no limit)
        top_p: sample among the most likely tokens whose probability reaches p (default: no limit)
        stop: stop text (its first token) or '#ID' for a token id; repeat for several; default: the tokenizer's eos
        tokenizer: tokenizer name or folder, or 'byte' (default: the checkpoint's own)
        dtype: parameter dtype; default: bfloat16 on CUDA, float32 on CPU
        device: default: cuda when available, else cpu
        seed: sampling seed
        cuda_graph: run the decode step as a CUDA graph (false: eagerly)
        state_dtype: storage of the SSM states while decoding; default: the model's dtype, as mamba_ssm
            (float32: closer to exact over long outputs, slower at large batch)
        pdl: launch the decode kernels with programmatic dependent launch (Hopper and later)
        row_groups: step the batch as that many row groups in a pipeline, 0-3 (pure Mamba-2 models, Triton);
            default: 3 at batch 64-96 on CUDA, else 0 (off)
    """

    checkpoint: str
    prompt: Union[str, list[str]] = field(metadata={"repeatable": True})
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop: Union[str, list[str], None] = field(default=None, metadata={"repeatable": True})
    tokenizer: Optional[str] = None
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    device: Optional[str] = None
    seed: Optional[int] = None
    cuda_graph: bool = True
    state_dtype: Optional[Literal["float32", "bfloat16"]] = None
    pdl: bool = True
    row_groups: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not self.prompt:
            raise ValueError("--prompt: give at least one prompt")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top_k must be at least 1 (leave it out for no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must lie in (0, 1], got {self.top_p}")
        if any(s == "" for s in self.stop or []):
            raise ValueError("--stop needs a text or #ID")
        if self.row_groups is not None and self.row_groups not in (0, 1, 2, 3):
            raise ValueError(f"--row_groups must be 0, 1, 2 or 3, got {self.row_groups}")


def _stop_ids(stop: Optional[list[str]], tok: Tokenizer, vocab: int) -> list[int]:
    if stop is None:
        return [] if tok.eos_id is None else [tok.eos_id]
    ids = []
    for s in stop:
        if s.startswith("#") and s[1:].isdigit():
            if int(s[1:]) >= vocab:
                raise ValueError(f"--stop {s}: the model's token ids end at {vocab - 1}")
            ids.append(int(s[1:]))
        elif tok.encode(s):
            ids.append(tok.encode(s)[0])
    return ids


def generate_main(cfg: GenerateConfig) -> int:
    """Run `lit-mamba2 generate`: print each prompt with its continuation. A bad option is a ValueError naming it."""
    from lit_mamba2.checkpoints import DTYPES, load

    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine (or this torch build) has no CUDA device")
    dtype = DTYPES[cfg.dtype] if cfg.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    loaded = load(Mamba2LMHeadModel, cfg.checkpoint, dtype=dtype, device=device, tokenizer=cfg.tokenizer)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise ValueError(f"{cfg.checkpoint}: the checkpoint has no tokenizer; pass --tokenizer NAME (or byte)")
    vocab = model.config.padded_vocab_size
    stops = _stop_ids(cfg.stop, tok, vocab)
    if cfg.row_groups:
        from lit_mamba2.inference import ModelWeights, pipeline_unsupported_reason

        reason = pipeline_unsupported_reason(ModelWeights.of(model))
        if reason is not None:
            raise ValueError(f"--row_groups: {reason}")
    prompts = [tok.encode(p) for p in cfg.prompt]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every --prompt must encode to at least one token")
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    single = len(prompts) == 1
    rows: list[list[int]] = [[] for _ in prompts]
    printed = ""
    tokens = stream(model, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                    top_p=cfg.top_p, stop_tokens=stops, generator=generator,
                    cuda_graph=None if cfg.cuda_graph else False,
                    state_dtype=DTYPES[cfg.state_dtype] if cfg.state_dtype else None, pdl=cfg.pdl,
                    row_groups=cfg.row_groups)
    try:
        first = next(tokens)  # the caches (a KV cache of the whole length for attention layers) exist from here
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        raise ValueError(f"out of memory for {len(prompts)} prompts of up to {max(map(len, prompts))} tokens + "
                         f"--max_new_tokens {cfg.max_new_tokens} ({type(e).__name__}); ask for fewer new tokens "
                         "or prompts") from None
    if single:
        sys.stdout.write(cfg.prompt[0])
        sys.stdout.flush()
    for token in itertools.chain([first], tokens):
        for r, t in zip(rows, token.tolist()):
            if not (r and r[-1] in stops):
                r.append(t)
        if single:
            text = tok.decode([t for t in rows[0] if t not in stops])
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    if single:
        sys.stdout.write("\n")
    else:
        for p, r in zip(cfg.prompt, rows):
            print(f"--- {p!r}\n{p}{tok.decode([t for t in r if t not in stops])}")
    return 0
