"""Instruction data for fine-tuning: Alpaca and chat records, rendered with a prompt template, masked, packed.

Records (one JSON object per line of a .jsonl file, or a .json file holding a list of them):
- Alpaca: {"instruction": str, "input": str (optional), "output": str}
- chat:   {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}, at least one assistant
  message; every assistant message is a response.

Rendering (`data.template`): with the tokenizer's chat template (a Hugging Face tokenizer that has one; an Alpaca
record is the chat [user: instruction + input, assistant: output]), or with the built-in templates: Stanford
Alpaca's prompt for Alpaca records, `### User:` / `### Assistant:` headers for chats. The prompt and each response
are tokenized separately (as a prompt is at generation time); each response ends with eos.

Labels: the next token where it is a response token (its eos included), ignore_index elsewhere: the loss counts
responses only. An example of n tokens takes n - 1 positions (inputs t[:-1], labels t[1:]); longer than seq_len
positions, it is truncated (its end cut off; dropped if no response token is left) or dropped, as `data.overlong`
says, and counted. With `data.pack`, examples fill rows of seq_len positions back to back, each its own document
in seq_idx (no state, conv tap or attention crosses between examples; attention's positions restart with each);
without, each example is a row of its own, padded. A malformed record stops the run with a one-line error naming
its file, line and field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from lit_mamba2.tokenizers import HFTokenizer, Tokenizer
from lit_mamba2.training.data import IGNORE_INDEX, LMDataModule

ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


class RecordError(ValueError):
    """A malformed record: the message names the file, the line and the field."""


@dataclass
class InstructionDataConfig:
    """Instruction data (lit-mamba2 finetune).

    Args:
        train: JSON Lines (.jsonl) or JSON (.json, a list) files of Alpaca or chat records
        val: files of validation records; empty: val_fraction of the training records (chosen by seed)
        val_fraction: the share of training records held out for validation when val is empty (0: none)
        template: auto: the tokenizer's chat template if it has one, else the built-in templates; tokenizer: the
            tokenizer's chat template (an error if it has none); builtin: Alpaca's prompt / ### headers for chats
        seq_len: positions per row; an example of n tokens takes n - 1
        batch_size: rows per data-parallel rank and step
        global_batch_size: rows per optimizer step over all ranks (sets the gradient accumulation); null: not set
        pack: examples packed back to back into rows (each its own document); false: one padded example per row
        overlong: an example longer than seq_len is truncated (its end cut) or dropped
        seed: the validation split, the packing order and the training order
        num_workers: DataLoader workers
    """

    kind: ClassVar[str] = "instructions"
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    val_fraction: float = 0.05
    template: Literal["auto", "tokenizer", "builtin"] = "auto"
    seq_len: int = 512
    batch_size: int = 8
    global_batch_size: Optional[int] = None
    pack: bool = True
    overlong: Literal["truncate", "drop"] = "truncate"
    seed: int = 1234
    num_workers: int = 0

    def __post_init__(self):
        self.train, self.val = [str(p) for p in self.train], [str(p) for p in self.val]
        for name in ("seq_len", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"data.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.template not in ("auto", "tokenizer", "builtin"):
            raise ValueError(f"data.template must be 'auto', 'tokenizer' or 'builtin', got {self.template!r}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {self.overlong!r}")


# ---- reading records --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One record as read: its place (for messages) and its contents, as a chat (Alpaca: user + assistant)."""

    where: str  # "<file>, line <n>"
    messages: tuple  # ((role, content), ...)
    alpaca: Optional[tuple] = None  # (instruction, input, output) for an Alpaca record


def read_records(path: str | os.PathLike) -> list[Record]:
    """The records of a .jsonl file (one per line; blank lines skipped) or a .json file (a list), each checked."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        items = _json_list(text, path)
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise RecordError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not items:
        raise RecordError(f"{path}: holds no records")
    return [parse_record(obj, f"{path}, line {n}") for n, obj in items]


def _json_list(text: str, path: Path) -> list[tuple[int, object]]:
    """A JSON array's elements with the line each starts on."""
    decoder = json.JSONDecoder()

    def line_of(i):
        return text.count("\n", 0, i) + 1

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def decode(i):
        try:
            return decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None

    i = skip(0)
    if i == len(text) or text[i] != "[":
        if i < len(text):
            obj, _ = decode(i)
            raise RecordError(f"{path}, line {line_of(i)}: a .json file holds a list of records, got "
                              f"{_kind(obj)} (one record per line is a .jsonl file)")
        return []
    items, i = [], skip(i + 1)
    while i < len(text) and text[i] != "]":
        obj, end = decode(i)
        items.append((line_of(i), obj))
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] != "]":
            raise RecordError(f"{path}, line {line_of(i)}: not valid JSON (expected ',' or ']' after a record)")
    if i == len(text):
        raise RecordError(f"{path}, line {line_of(i)}: not valid JSON (the list is not closed)")
    return items


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _text(obj: dict, key: str, where: str, required: bool = True) -> str:
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise RecordError(f"{where}, field {key!r}: missing")
        return ""
    if not isinstance(obj[key], str):
        raise RecordError(f"{where}, field {key!r}: expected a string, got {_kind(obj[key])}")
    return obj[key]


def parse_record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: a record is a JSON object, got {_kind(obj)}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise RecordError(f"{where}, field 'messages': expected a non-empty list of {{role, content}} objects, "
                              f"got {_kind(messages) if messages != [] else 'an empty list'}")
        out = []
        for k, m in enumerate(messages):
            at = f"messages[{k}]"
            if not isinstance(m, dict):
                raise RecordError(f"{where}, field {at!r}: expected an object with role and content, got {_kind(m)}")
            role = _field_text(m, "role", where, at)
            if role not in ROLES:
                raise RecordError(f"{where}, field '{at}.role': {role!r} is not one of {', '.join(ROLES)}")
            out.append((role, _field_text(m, "content", where, at)))
        if not any(role == "assistant" for role, _ in out):
            raise RecordError(f"{where}, field 'messages': no assistant message (nothing to train on)")
        return Record(where, tuple(out))
    if "instruction" in obj or "output" in obj:
        instruction, output = _text(obj, "instruction", where), _text(obj, "output", where)
        inp = _text(obj, "input", where, required=False)
        user = instruction + (f"\n\n{inp}" if inp else "")
        return Record(where, (("user", user), ("assistant", output)), (instruction, inp, output))
    raise RecordError(f"{where}: neither an Alpaca record (fields instruction, input, output) nor a chat record "
                      f"(field messages); its fields: {sorted(obj)}")


def _field_text(m: dict, key: str, where: str, at: str) -> str:
    if key not in m:
        raise RecordError(f"{where}, field '{at}.{key}': missing")
    if not isinstance(m[key], str):
        raise RecordError(f"{where}, field '{at}.{key}': expected a string, got {_kind(m[key])}")
    return m[key]


# ---- rendering and tokenizing -----------------------------------------------------------------------------------

def chat_template_of(tokenizer: Tokenizer) -> Optional[str]:
    return getattr(tokenizer.hf, "chat_template", None) if isinstance(tokenizer, HFTokenizer) else None


def render(record: Record, tokenizer: Tokenizer, use_chat_template: bool) -> list[tuple[str, bool]]:
    """The record as text segments (text, is_response), in order; each response is followed by eos (added when
    tokenizing)."""
    if use_chat_template:
        return _render_chat_template(record, tokenizer)
    if record.alpaca is not None:
        instruction, inp, output = record.alpaca
        prompt = (ALPACA_PROMPT.format(instruction=instruction, input=inp) if inp
                  else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
        return [(prompt, False), (output, True)]
    segments, prompt = [], ""
    for role, content in record.messages:
        if role == "assistant":
            segments += [(prompt + "### Assistant:\n", False), (content, True)]
            prompt = "\n\n"
        else:
            prompt += f"### {role.capitalize()}:\n{content}\n\n"
    return segments


def _render_chat_template(record: Record, tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """Each assistant message's text is what the template adds for it after the generation prompt of the messages
    before it (trailing whitespace goes to the next prompt); messages after the last assistant one are left out."""
    hf = tokenizer.hf
    messages = [{"role": r, "content": c} for r, c in record.messages]
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prompt = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = hf.apply_chat_template(messages[:i + 1], tokenize=False)
        except Exception as e:  # noqa: BLE001 - jinja raises its own errors (e.g. a template's role rules)
            raise RecordError(f"{record.where}, field 'messages': the tokenizer's chat template refuses it "
                              f"({type(e).__name__}: {e})") from None
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise RecordError(f"{record.where}, field 'messages': the tokenizer's chat template does not render the "
                              "conversation as a growing text, so responses cannot be told apart; use "
                              "data.template: builtin")
        response = full[len(prompt):].rstrip()
        segments += [(prompt[len(done):], False), (response, True)]
        done = prompt + response
    return segments


@dataclass
class Counts:
    records: int = 0
    truncated: int = 0
    dropped: int = 0

    def describe(self, seq_len: int, overlong: str) -> str:
        parts = [f"{self.records} records"]
        if self.truncated:
            parts.append(f"{self.truncated} longer than seq_len {seq_len} truncated")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (longer than seq_len {seq_len}"
                         + (", no response token left after truncation" if overlong == "truncate" else "") + ")")
        return ", ".join(parts)


def tokenize(record: Record, tokenizer: Tokenizer, use_chat_template: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and the response mask (True for response tokens and each response's eos)."""
    ids, mask = [], []
    for text, is_response in render(record, tokenizer, use_chat_template):
        piece = tokenizer.encode(text) if text else []
        if is_response and (not piece or piece[-1] != tokenizer.eos_id):
            piece = piece + [tokenizer.eos_id]
        ids += piece
        mask += [is_response] * len(piece)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def examples(records: list[Record], tokenizer: Tokenizer, seq_len: int, overlong: str, use_chat_template: bool,
             progress: bool = False) -> tuple[list[tuple[np.ndarray, np.ndarray]], Counts]:
    """(input_ids, labels) per record, each of at most seq_len positions, and what was truncated or dropped."""
    from tqdm.auto import tqdm

    out, counts = [], Counts(records=len(records))
    for record in tqdm(records, desc="tokenizing records", unit="record", disable=not progress):
        ids, mask = tokenize(record, tokenizer, use_chat_template)
        if len(ids) - 1 > seq_len:
            if overlong == "drop":
                counts.dropped += 1
                continue
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            if not mask[1:].any():
                counts.dropped += 1
                continue
            counts.truncated += 1
        out.append((ids[:-1], np.where(mask[1:], ids[1:], IGNORE_INDEX)))
    return out, counts


# ---- rows -------------------------------------------------------------------------------------------------------

def pack(items: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Examples back to back into rows of seq_len positions, in the given order, a new row when the next one does
    not fit; seq_idx numbers the examples of a row (the padding at its end is one more document)."""
    rows, row, used = [], [], 0
    for x in items:
        if used + len(x[0]) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(x)
        used += len(x[0])
    if row:
        rows.append(row)
    out = {"input_ids": np.full((len(rows), seq_len), pad_id, dtype=np.int64),
           "labels": np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64),
           "seq_idx": np.zeros((len(rows), seq_len), dtype=np.int32)}
    for r, row in enumerate(rows):
        at = 0
        for k, (inputs, labels) in enumerate(row):
            out["input_ids"][r, at:at + len(inputs)] = inputs
            out["labels"][r, at:at + len(inputs)] = labels
            out["seq_idx"][r, at:at + len(inputs)] = k
            at += len(inputs)
        out["seq_idx"][r, at:] = len(row)
    return out


def pad(items: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row, padded at the end (the model is causal: the padding reaches no example token)."""
    out = {"input_ids": np.full((len(items), seq_len), pad_id, dtype=np.int64),
           "labels": np.full((len(items), seq_len), IGNORE_INDEX, dtype=np.int64)}
    for r, (inputs, labels) in enumerate(items):
        out["input_ids"][r, :len(inputs)] = inputs
        out["labels"][r, :len(inputs)] = labels
    return out


class Rows(Dataset):
    """Rows of equal length: {input_ids, labels[, seq_idx]} tensors."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.arrays.items()}


def build_rows(items, config: InstructionDataConfig, pad_id: int) -> Rows:
    return Rows((pack if config.pack else pad)(items, config.seq_len, pad_id))


# ---- the DataModule ---------------------------------------------------------------------------------------------

class InstructionDataModule(LMDataModule):
    """Instruction records as rows (LMDataModule's samplers and loaders: a resumed run sees the batches an
    uninterrupted one would)."""

    _ORDER_FIELDS = ("train", "val", "val_fraction", "template", "seq_len", "batch_size", "pack", "overlong", "seed")

    def __init__(self, config: InstructionDataConfig, tokenizer: Tokenizer, max_steps: Optional[int] = None,
                 accumulate_grad_batches: Optional[int] = None, vocab_size: Optional[int] = None, verbose: bool = True,
                 progress: bool = True):
        super().__init__(config, tokenizer, max_steps, accumulate_grad_batches, vocab_size)
        self.verbose, self.progress = verbose, progress  # the summary printed; a progress bar while tokenizing
        self.summary: Optional[str] = None
        if tokenizer.eos_id is None:
            raise ValueError(f"tokenizer {tokenizer!r} has no eos token; every response must end with one")
        if not config.train:
            raise ValueError("data.train: no files given (JSON Lines or JSON files of Alpaca or chat records)")
        template = chat_template_of(tokenizer)
        if config.template == "tokenizer" and template is None:
            raise ValueError(f"data.template: tokenizer, but {tokenizer!r} has no chat template (use auto or builtin)")
        self.use_chat_template = template is not None and config.template != "builtin"

    def prepare_data(self) -> None:
        pass  # every rank reads and tokenizes the records itself (in setup)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        c = self.config
        train = [r for p in c.train for r in read_records(p)]
        val = [r for p in c.val for r in read_records(p)]
        rng = np.random.default_rng(c.seed)
        if not c.val and c.val_fraction > 0:
            if len(train) < 2:
                raise ValueError(f"data.train holds {len(train)} record: too few to hold some out for validation "
                                 "(give data.val files, or data.val_fraction: 0)")
            n_val = max(1, int(len(train) * c.val_fraction))
            chosen = set(rng.choice(len(train), n_val, replace=False).tolist())
            val = [r for i, r in enumerate(train) if i in chosen]
            train = [r for i, r in enumerate(train) if i not in chosen]
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        first = self._rank_world()[0] == 0
        train_items, train_counts = examples(train, self.tokenizer, c.seq_len, c.overlong, self.use_chat_template,
                                             self.progress and first)
        if not train_items:
            raise ValueError(f"data.train: every record is longer than data.seq_len = {c.seq_len} and was dropped")
        self._check_ids(train_items)
        order = rng.permutation(len(train_items))  # packing in file order would put similar records together
        self.train_set = build_rows([train_items[i] for i in order], c, pad_id)
        val_items, val_counts = examples(val, self.tokenizer, c.seq_len, c.overlong, self.use_chat_template)
        self.val_set = build_rows(val_items, c, pad_id) if val_items else None
        template = "the tokenizer's chat template" if self.use_chat_template else "built-in"
        val_rows = f"{len(self.val_set)} rows" if self.val_set is not None else "no rows"
        self.summary = (f"data: train {train_counts.describe(c.seq_len, c.overlong)} -> {len(self.train_set)} rows "
                        f"of {c.seq_len} ({'packed' if c.pack else 'padded'}, {_share(self.train_set)} of positions "
                        f"trained); validation {val_counts.describe(c.seq_len, c.overlong)} -> {val_rows}; "
                        f"template: {template}")
        if self.verbose and first:
            print(self.summary, flush=True)

    def _check_ids(self, items) -> None:
        if self.vocab_size is None:
            return
        top = max(int(x.max()) for x, _ in items if len(x))
        if top >= self.vocab_size:
            raise ValueError(f"token id {top} is outside the model's vocabulary (model.vocab_size = "
                             f"{self.vocab_size}): the tokenizer is not the model's")

    def val_tokens(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)


def _share(rows: Rows) -> str:
    labels = rows.arrays["labels"]
    return f"{(labels != IGNORE_INDEX).float().mean().item():.0%}"
