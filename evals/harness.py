"""lm-evaluation-harness backend: the `LM` subclass `LitMamba2LM`, registered as model "lit_mamba2".

Importing this module (`import lit_mamba2.evals.harness`) registers it; `lit-mamba2 evaluate` imports it. Then

    lm_eval.simple_evaluate(
        model="lit_mamba2", tasks=[...], batch_size=16,
        model_args="pretrained=<folder, Hub id or .ckpt>,dtype=bfloat16,device=cuda,max_length=2048")

The checkpoint is read by `lit_mamba2.checkpoints.load` (both folder formats, safetensors or torch files, a training
.ckpt) with its own tokenizer (`tokenizer=NAME` or `byte` names another). Contexts are encoded as the tokenizer gives
them (no BOS/EOS added); an empty context is the eos token, as lm-eval's HFLM does (TemplateLM); rows longer than
`max_length` keep their last tokens. loglikelihood requests are sorted longest first and batched (right-padded: the
model is causal, so padding after a row never reaches it); generate_until runs lit_mamba2.generation.stream (the
cached decoder, batched, left-padded), stops a row at its first stop string (cut from the decoded text) or eos.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lit_mamba2.checkpoints import as_dtype, load
from lit_mamba2.generation import stream
from lit_mamba2.model import Mamba2LMHeadModel


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")


@register_model("lit_mamba2", "lit-mamba2")
class LitMamba2LM(TemplateLM):
    """A lit-mamba2 checkpoint for lm-eval. pretrained: folder, Hub repo id or training .ckpt (or a
    Mamba2LMHeadModel, with `tokenizer=` a Tokenizer); dtype: float32 / bfloat16 / float16 (default: bfloat16 on
    CUDA, float32 on CPU); device: default cuda when available; max_length: tokens a row keeps (default 2048);
    batch_size: rows per forward ("auto" counts as 16); max_gen_toks: default generation length."""

    def __init__(self, pretrained, dtype: Optional[str] = None, device: Optional[str] = None,
                 max_length: Optional[int] = 2048, batch_size: Union[int, str] = 1,
                 max_batch_size: Optional[int] = 64, tokenizer=None, max_gen_toks: int = 256,
                 revision: Optional[str] = None, cuda_graph: Union[bool, str] = True, **ignored) -> None:
        super().__init__()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(pretrained, torch.nn.Module):
            if tokenizer is None or isinstance(tokenizer, str):
                from lit_mamba2.tokenizers import load_tokenizer
                tokenizer = load_tokenizer(tokenizer or "byte")
            model, tok = pretrained, tokenizer
        else:
            dt = as_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
            loaded = load(Mamba2LMHeadModel, str(pretrained), revision=revision, dtype=dt, device=dev,
                          tokenizer=tokenizer)
            model, tok = loaded.model, loaded.tokenizer
            if tok is None:
                raise ValueError(f"{pretrained}: the checkpoint has no tokenizer; pass tokenizer=NAME (or byte)")
        if tok.eos_id is None:
            raise ValueError("lit_mamba2: the tokenizer has no eos token (needed for empty contexts and generation)")
        self.model = model.eval()
        self.tok = tok
        self.device_ = dev
        self._max_length = int(max_length) if max_length else 2048
        bs = str(batch_size).split(":")[0]
        self.batch_size_ = 16 if bs == "auto" else int(bs)
        self.max_batch_size = int(max_batch_size) if max_batch_size else 64
        self.max_gen_toks = int(max_gen_toks)
        self.cuda_graph = None if _as_bool(cuda_graph) else False
        self.vocab = model.config.vocab_size
        if ignored:
            from lm_eval.utils import eval_logger
            eval_logger.warning(f"lit_mamba2: ignoring model arguments {sorted(ignored)}")

    # --- what TemplateLM asks for ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.device_

    @property
    def tokenizer_name(self) -> str:
        return self.tok.identity.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # --- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()  # (not inference_mode: the model may be one in training, whose tensors must stay usable)
    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded rows -> log-probabilities (batch, L, vocab) in float32."""
        L = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        logits = self.model(ids.to(self.device_))[..., :self.vocab]
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None):
        """requests: ((context, continuation), context_enc, continuation_enc) -> (logprob, is_greedy) each."""
        def key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        collator = Collator(requests, sort_fn=key)
        n = override_bs or self.batch_size_
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in collator.get_batched(n=n):
            rows, conts = [], []
            for _, ctx, cont in chunk:
                if not cont:
                    raise ValueError("an empty continuation has no likelihood to score")
                row = (ctx + cont)[-(self._max_length + 1):][:-1]
                rows.append(row)
                conts.append(cont[-len(row):] if len(cont) > len(row) else cont)  # (a continuation past max_length)
            logprobs = self._logprobs(rows)
            for (req, _, _), row, cont, lp in zip(chunk, rows, conts, logprobs):
                n_cont = len(cont)
                lp = lp[len(row) - n_cont:len(row)]  # the positions predicting the continuation
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(dim=-1) == target).all())
                score = float(lp.gather(-1, target[:, None]).sum())
                out.append((score, greedy))
                if req is not None:
                    self.cache_hook.add_partial("loglikelihood", req, (score, greedy))
                bar.update(1)
        bar.close()
        return collator.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood, in disjoint windows of max_length tokens (the first after eos)."""
        windows, owner = [], []
        for i, req in enumerate(tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling")):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True) if windows else []
        totals = [0.0] * len(requests)
        for i, (s, _) in zip(owner, scores):
            totals[i] += s
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # --- generation ------------------------------------------------------------------------------------------
    def _generate(self, prompts: list[list[int]], until: list[str], max_new: int, temperature: float) -> list[str]:
        eos = self.tok.eos_id
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for token in stream(self.model, prompts, max_new, temperature=temperature, stop_tokens=[eos],
                            pad_id=eos, cuda_graph=self.cuda_graph):
            for i, t in enumerate(token.tolist()):
                if done[i]:
                    continue
                if t == eos:
                    done[i] = True
                    continue
                rows[i].append(t)
                if until and any(s in self.tok.decode(rows[i][-64:]) for s in until):
                    done[i] = True
            if all(done):
                break
        texts = []
        for r in rows:
            text = self.tok.decode(r)
            for s in until:
                if s:
                    text = text.split(s)[0]
            texts.append(text)
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        def key(req):
            toks = self.tok_encode(req[0])
            return -len(toks), req[0]

        collator = Collator([r.args for r in requests], sort_fn=key, group_by="gen_kwargs",
                            group_fn=lambda x: x[1])
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for chunk in collator.get_batched(n=self.batch_size_):
            contexts, all_kwargs = zip(*chunk)
            kwargs = dict(all_kwargs[0])
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = _as_bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0 if not do_sample else 1.0))
            if not do_sample:
                temperature = 0.0
            keep = max(self._max_length - max_new, 1)
            prompts = [self.tok_encode(c, left_truncate_len=keep) if c else [] for c in contexts]
            prompts = [p if p else [self.tok.eos_id] for p in prompts]
            texts = self._generate(prompts, until, max_new, temperature)
            for ctx, kw, text in zip(contexts, all_kwargs, texts):
                out.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, kw), text)
                bar.update(1)
        bar.close()
        return collator.get_original(out)
