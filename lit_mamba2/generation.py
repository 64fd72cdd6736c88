"""Text generation with the recurrent state cache: sampling, prompts, `stream` / `generate` and the CLI verb.

The prompts go through the chunked path once (prefill: SSD and conv return their final states, attention its keys
and values); then each new token runs the decode engine's step (lit_mamba2.inference.Decoder), which advances
every layer's conv/SSM state or KV cache in place. Prompts of different lengths are left-padded and the padding is
its own document (seq_idx 0 before each row's prompt, 1 over it), so no pad token, conv tap or state reaches a
prompt; attention masks the padded KV slots while decoding.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Iterator, Optional, Sequence, Union

import torch

from lit_mamba2.inference import Decoder
from lit_mamba2.model import Mamba2LMHeadModel

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
class _ByteCodec:
    """The built-in byte tokenizer of training (id = UTF-8 byte, 0 ends a document)."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return 256


def generate_main(argv: Optional[list[str]] = None) -> int:
    from lit_mamba2.checkpoints import DTYPES, CheckpointError, from_pretrained, load_hf_tokenizer

    parser = argparse.ArgumentParser(
        prog="lit-mamba2 generate",
        description="Generate text from a checkpoint (a mamba_ssm or transformers folder, a Hub repo id, or a "
                    "training .ckpt), streaming tokens as they come.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, Hub repo id or training .ckpt")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--stop", action="append", default=None,
                        help="stop text (its first token) or #ID for a token id; default: the tokenizer's eos")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or folder, or 'byte' (default: the "
                        "checkpoint's own)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on CUDA")
    parser.add_argument("--state-dtype", choices=["float32", "bfloat16"], default=None,
                        help="storage of the SSM states while decoding; default: the model's dtype, as mamba_ssm "
                             "(float32: closer to exact over long outputs, slower at large batch)")
    parser.add_argument("--no-pdl", action="store_true",
                        help="launch the decode kernels without programmatic dependent launch (Hopper and later)")
    parser.add_argument("--row-groups", type=int, choices=[0, 1, 2, 3], default=None,
                        help="step the batch as that many row groups in a pipeline (pure Mamba-2 models, Triton); "
                             "default: 3 at batch 64-96 on CUDA, else 0 (off)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be at least 1 (leave it out for no limit)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--top-p must lie in (0, 1]")
    if any(s == "" for s in args.stop or []):
        parser.error("--stop needs a text or #ID")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine (or this torch build) has no CUDA device")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        model = from_pretrained(args.checkpoint, dtype=dtype, device=device,
                                tokenizer=args.tokenizer if args.tokenizer not in (None, "byte") else None)
    except (CheckpointError, FileNotFoundError) as e:
        parser.exit(2, f"lit-mamba2 generate: error: {e}\n")
    tok = getattr(model, "tokenizer", None)
    if args.tokenizer == "byte" or tok == "byte":
        tok = _ByteCodec()
    elif args.tokenizer:
        tok = tok or load_hf_tokenizer(args.tokenizer)
    if tok is None:
        parser.exit(2, "lit-mamba2 generate: error: the checkpoint has no tokenizer; pass --tokenizer NAME\n")
    vocab = model.config.padded_vocab_size
    if len(tok) > vocab:
        parser.exit(2, f"lit-mamba2 generate: error: the tokenizer has {len(tok)} tokens but the model only "
                       f"{vocab} embedding rows; pass the tokenizer the model was trained with (--tokenizer)\n")
    model.eval()
    stops = []
    for s in args.stop or []:
        if s.startswith("#") and s[1:].isdigit():
            if int(s[1:]) >= vocab:
                parser.error(f"--stop {s}: the model's token ids end at {vocab - 1}")
            stops.append(int(s[1:]))
        else:
            enc = tok.encode(s, add_special_tokens=False)
            if enc:
                stops.append(enc[0])
    if args.stop is None and getattr(tok, "eos_token_id", None) is not None:
        stops.append(int(tok.eos_token_id))
    if args.row_groups:
        from lit_mamba2.inference import ModelWeights, pipeline_unsupported_reason

        reason = pipeline_unsupported_reason(ModelWeights.of(model))
        if reason is not None:
            parser.exit(2, f"lit-mamba2 generate: error: --row-groups: {reason}\n")
    prompts = [tok.encode(p, add_special_tokens=False) for p in args.prompt]
    if any(len(p) == 0 for p in prompts):
        parser.error("every --prompt must encode to at least one token")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    single = len(prompts) == 1
    rows: list[list[int]] = [[] for _ in prompts]
    printed = ""
    if single:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    tokens = stream(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, stop_tokens=stops, generator=generator,
                    cuda_graph=False if args.no_cuda_graph else None,
                    state_dtype=DTYPES[args.state_dtype] if args.state_dtype else None, pdl=not args.no_pdl,
                    row_groups=args.row_groups)
    try:
        first = next(tokens)  # the caches (a KV cache of the whole length for attention layers) exist from here
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        parser.exit(2, f"lit-mamba2 generate: error: out of memory for {len(prompts)} prompts of up to "
                       f"{max(map(len, prompts))} tokens + --max-new-tokens {args.max_new_tokens} "
                       f"({type(e).__name__}); ask for fewer new tokens or prompts\n")
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
        for p, r in zip(args.prompt, rows):
            print(f"--- {p!r}\n{p}{tok.decode([t for t in r if t not in stops])}")
    return 0
