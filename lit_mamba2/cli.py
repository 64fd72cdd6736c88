"""The `lit-mamba2` command: one verb per job, every verb's options parsed the same way.

A verb's options are the fields of its dataclass config (PretrainConfig, FinetuneConfig, GenerateConfig,
ConvertConfig, EvaluateConfig, PushConfig, ...), read by jsonargparse: `--config file.yaml` gives any of them as
YAML, `--section.key value` sets one (in order: later wins), `--help` lists them all. A misspelled key or section, a
stray word or a value of the wrong type is reported first, in one line naming it and the closest valid key. A
field whose metadata has `repeatable` is a list of texts: each `--name TEXT` adds one, taken as it is (a prompt
such as "- item" or "#5" is not read as YAML).

Adding a verb is one entry in COMMANDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import os
import re
import signal
import sys
import typing
from typing import Any, Callable, Literal, Optional, Union

from typing_extensions import Unpack



class UsageError(ValueError):
    """A command line or config file the verb does not accept; the message names the cause in one line."""


# ---------------------------------------------------------------------------------------------------------------
# the config's shape: {field: sub-schema (a dataclass section) or the field's type (a value)}
# ---------------------------------------------------------------------------------------------------------------
def _strip_optional(t):
    if typing.get_origin(t) is Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def _schema(config_class) -> dict[str, Any]:
    """Each key of a config dataclass: a section's schema, or the value's type. A class whose __init__ takes
    `**given: Unpack[SomeTypedDict]` (ModelArgs) takes that TypedDict's keys instead of its other fields."""
    hints = typing.get_type_hints(config_class)
    given = _given_keys(config_class)
    out = {}
    for f in dataclasses.fields(config_class):
        if given is not None and f.name not in inspect.signature(config_class.__init__).parameters:
            continue  # stores what **given took (ModelArgs.overrides): not a key of its own
        t = _strip_optional(hints[f.name])
        out[f.name] = _schema(t) if dataclasses.is_dataclass(t) else t
    return {**out, **(given or {})}


def _given_keys(config_class) -> Optional[dict[str, Any]]:
    """The keys of `**given: Unpack[TD]` in config_class.__init__, as a schema (None: no such parameter)."""
    for p in inspect.signature(config_class.__init__).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            ann = config_class.__init__.__annotations__.get(p.name)
            if typing.get_origin(ann) is Unpack:
                return _typeddict_schema(typing.get_args(ann)[0])
    return None


def _typeddict_schema(td) -> dict[str, Any]:
    out = {}
    for k, t in typing.get_type_hints(td).items():
        t = _strip_optional(t)
        out[k] = _typeddict_schema(t) if typing.is_typeddict(t) else t
    return out


def _keys(schema: dict, prefix: str = "") -> list[str]:
    """Every dotted key, sections and values."""
    out = []
    for k, v in schema.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _keys(v, prefix + k + ".")
    return out


def _is_mapping(t) -> bool:
    t = _strip_optional(t)
    return t is dict or typing.get_origin(t) is dict


def _describe(t) -> str:
    """A type as an error message says it: `an integer or null`, `one of 'hf', 'mamba_ssm'`."""
    if t is type(None):
        return "null"
    if typing.get_origin(t) is Union:
        return " or ".join(_describe(a) for a in typing.get_args(t))
    if typing.get_origin(t) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if dataclasses.is_dataclass(t) or isinstance(t, dict):
        return "a section (a mapping of its keys)"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a text", dict: "a mapping",
             list: "a list", tuple: "a list"}
    return names.get(typing.get_origin(t) or t, getattr(t, "__name__", str(t)))


def _node(schema: dict, key: str):
    node = schema
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------------------------
# unknown keys, with the closest valid one
# ---------------------------------------------------------------------------------------------------------------
def _suggest(schema: dict, path: list[str], part: str, rest: list[str]) -> Optional[str]:
    """The valid key closest to path + [part] + rest, or None."""
    siblings = _node(schema, ".".join(path)) if path else schema
    prefix = "".join(p + "." for p in path)
    candidates = list(siblings)
    norm = part.replace("-", "_")
    for flag in ("no_", "no"):  # --no-pdl: a boolean is set with a value
        name = norm[len(flag):]
        if norm.startswith(flag) and name in siblings and _strip_optional(siblings[name]) is bool:
            return f"{prefix}{name} false"
    if norm in siblings:
        close = [norm]
    else:
        if rest:  # part names a section: prefer sections
            candidates = [c for c in candidates if isinstance(siblings[c], dict)] or candidates
        close = difflib.get_close_matches(norm, candidates, n=1, cutoff=0.6)
    if close:
        full = prefix + ".".join([close[0], *rest])
        if rest and _node(schema, full) is None and not _is_mapping(siblings[close[0]]):
            return prefix + close[0]
        return full
    if rest and _node(schema, ".".join(rest)) is not None:  # --sampling.top_k for --top_k
        return ".".join(rest)
    # the key may belong to another section: --max_steps for --trainer.max_steps
    tail = ".".join([norm, *rest])
    every = _keys(schema)
    ends = [k for k in every if k.endswith("." + tail)]
    if ends:
        return ends[0]
    last = difflib.get_close_matches(norm, [k.rsplit(".", 1)[-1] for k in every], n=1, cutoff=0.75)
    return next((k for k in every if last and k.rsplit(".", 1)[-1] == last[0]), None)


def _check_key(schema: dict, key: str, show: Callable[[str], str], where: str = "", section: bool = False) -> Any:
    """The schema node of a dotted key (`section`: given a mapping, as in a YAML file); an unknown key or section
    is a UsageError naming it."""
    parts = key.split(".")
    node, path = schema, []
    for j, part in enumerate(parts):
        if not isinstance(node, dict):
            if _is_mapping(node):
                return None  # a mapping-valued field (ssm_cfg) takes any key below it
            raise UsageError(f"{where}{show('.'.join(path))} is a value ({_describe(node)}), not a section: it has no "
                             f"key {'.'.join(parts[j:])!r}")
        if part not in node:
            rest = parts[j + 1:]
            guess = _suggest(schema, path, part, rest)
            if guess is None and section and not rest:  # a section's mapping: its closest section
                sections = [k for k, v in node.items() if isinstance(v, dict)]
                close = difflib.get_close_matches(part.replace("-", "_"), sections, n=1, cutoff=0.6)
                guess = "".join(p + "." for p in path) + close[0] if close else None
            hint = f" (did you mean {show(guess)}?)" if guess else ""
            if rest:
                what = f"unknown section {'.'.join(path + [part])!r} in {show(key)}"
            elif section:
                what = f"unknown section {show(key)}"
            elif path:
                what = f"unknown key {show(key)}: section {'.'.join(path)!r} has no {part!r}"
            else:
                what = f"unknown option {show(key)}"
            raise UsageError(f"{where}{what}{hint}")
        node = node[part]
        path.append(part)
    return node


def _check_mapping(schema: dict, mapping: dict, prefix: str, show, where: str) -> None:
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        node = _check_key(schema, key, show, where, section=isinstance(v, dict))
        if isinstance(node, dict) and isinstance(v, dict):
            _check_mapping(schema, v, key + ".", show, where)


def _yaml_mapping(value: str) -> Optional[dict]:
    """A --config or section value as a mapping: a YAML file's contents, or inline YAML; None if neither."""
    import yaml

    try:
        if os.path.isfile(os.path.expanduser(value)):
            with open(os.path.expanduser(value)) as f:
                value = f.read()
        data = yaml.safe_load(value)
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _check_argv(config_class, schema: dict, argv: list[str]) -> None:
    """Every option names a key of the config, and every key in a --config file too."""
    def option(k):
        return f"--{k}"

    def quoted(k):
        return repr(k)

    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help") or tok.startswith("--print_config"):
            i += 1
            continue
        if not tok.startswith("--") or tok == "--":
            required = [f.name for f in dataclasses.fields(config_class)
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            example = f" (e.g. --{required[0]} {tok})" if required else ""
            raise UsageError(f"unexpected argument {tok!r}: every option is given as --key value{example}")
        name, inline = tok[2:].partition("=")[::2]
        has_inline = "=" in tok
        value = inline if has_inline else (argv[i + 1] if i + 1 < len(argv) else None)
        if name == "config":
            if value is not None and os.path.isfile(os.path.expanduser(value)) and _yaml_mapping(value) is None:
                raise UsageError(f"--config {value}: the file holds no YAML mapping of sections (it is empty, or "
                                 "not YAML); a recipe looks like recipes/default.yaml")
            if value is not None:
                mapping = _yaml_mapping(value)
                if mapping is not None:
                    _check_mapping(schema, mapping, "", quoted, f"{value}: ")
        else:
            key = name[:-1] if name.endswith("+") else name
            node = _check_key(schema, key, option)
            if isinstance(node, dict) and value is not None:  # a section given whole: --model '{name: x}'
                mapping = _yaml_mapping(value)
                if mapping is not None:
                    _check_mapping(schema, mapping, key + ".", option, "")
        i += 1 if has_inline else 2


def _gather_repeatable(config_class, argv: list[str]) -> list[str]:
    """--prompt A --prompt B -> --prompt '["A", "B"]' for the fields marked repeatable: each text as it is."""
    names = {f.name for f in dataclasses.fields(config_class) if f.metadata.get("repeatable")}
    if not names:
        return argv
    out, gathered, i = [], {}, 0
    while i < len(argv):
        tok = argv[i]
        name, _, inline = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        name = name[:-1] if name.endswith("+") else name
        if name in names and ("=" in tok or i + 1 < len(argv)):
            value = inline if "=" in tok else argv[i + 1]
            if name not in gathered:
                gathered[name] = []
                out += [f"--{name}", gathered[name]]  # filled in below, at the first occurrence's place
            gathered[name].append(value)
            i += 1 if "=" in tok else 2
            continue
        out.append(tok)
        i += 1
    return [json.dumps(t) if isinstance(t, list) else t for t in out]


def _one_line(e: Exception, schema: dict, argv: list[str]) -> str:
    """jsonargparse's message for a bad value as one line: the key, what it takes, what it got."""
    msg = str(e).strip()
    m = re.search(r'Parser key "([^"]+)"', msg)
    if m:
        key = m.group(1)
        shown = f"--{key}" if any(a.split("=")[0].rstrip("+") == f"--{key}" for a in argv) else repr(key)
        got = re.findall(r"Given value: (.*)", msg) or re.findall(r"Got value: (.*)", msg)
        node = _node(schema, key)
        want = _describe(node) if node is not None else "another value"
        return f"{shown}: expected {want}" + (f", got {got[-1].strip()!r}" if got else "")
    m = re.search(r"the following arguments are required: (.*)", msg)
    if m:
        names = [n.strip() for n in m.group(1).split(",")]
        return f"missing {', '.join('--' + n for n in names)} (required)"
    m = re.search(r'Key "([^"]+)" is required', msg)
    if m:
        return f"missing --{m.group(1)} (required)"
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def _recipe_parser(config_class, prog: str, description: str):
    """A jsonargparse parser whose keys are config_class's fields: --config <yaml> and dotted overrides."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    # no abbreviations: a misspelled key (--trainer.max_step) must be an error, not a prefix of another
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (see recipes/)")
    parser.add_class_arguments(config_class, fail_untyped=True)
    return parser


def parse_recipe(config_class, argv: list[str], prog: str, description: str = ""):
    """argv -> an instance of config_class (config files and overrides in order). A mistake is a UsageError whose
    message is one line naming it."""
    schema = _schema(config_class)
    argv = _gather_repeatable(config_class, list(argv))
    _check_argv(config_class, schema, argv)
    parser = _recipe_parser(config_class, prog, description)
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise UsageError(_one_line(e, schema, argv)) from None
    init = parser.instantiate(namespace)
    return config_class(**{f.name: init[f.name] for f in dataclasses.fields(config_class)})


# ---------------------------------------------------------------------------------------------------------------
# the verbs
# ---------------------------------------------------------------------------------------------------------------
def _train(verb: str, run: Callable, cfg) -> Optional[int]:
    """A training verb's run: Lightning's errors for bad input as ours, SIGTERM as exit status 143."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        run(cfg)
    except MisconfigurationException as e:  # e.g. an accelerator this machine does not have: bad input
        raise ValueError(str(e)) from None
    except SIGTERMException:  # (a SystemExit without a code: the shell would see success)
        print(f"lit-mamba2 {verb}: stopped by SIGTERM; {cfg.trainer.out_dir}/checkpoints/last.ckpt holds the "
              "last finished step (continue with --resume true)", file=sys.stderr)
        return 128 + signal.SIGTERM


def pretrain_command(argv: list[str]) -> Optional[int]:
    from lit_mamba2.training.pretrain import PretrainConfig, pretrain

    cfg = parse_recipe(PretrainConfig, argv, "lit-mamba2 pretrain",
                       "Pretrain a Mamba-2 language model. With no arguments: the built-in default "
                       "(recipes/default.yaml): a small model on the Python standard library, on CPU, in minutes.")
    return _train("pretrain", pretrain, cfg)


def finetune_command(argv: list[str]) -> Optional[int]:
    from lit_mamba2.training.finetune import FinetuneConfig, finetune

    cfg = parse_recipe(FinetuneConfig, argv, "lit-mamba2 finetune",
                       "Fine-tune a checkpoint (Hub id, mamba_ssm or transformers folder, or training .ckpt) on "
                       "instruction data (Alpaca or chat records), fully or with LoRA; the checkpoint with the "
                       "lowest validation loss is exported for transformers or mamba_ssm.")
    return _train("finetune", finetune, cfg)


def convert_command(argv: list[str]) -> Optional[int]:
    from lit_mamba2.checkpoints import ConvertConfig, convert
    from lit_mamba2.model import Mamba2LMHeadModel

    cfg = parse_recipe(ConvertConfig, argv, "lit-mamba2 convert",
                       "Convert a checkpoint (mamba_ssm folder, transformers folder, Hub repo id or Lightning "
                       ".ckpt) into a folder that transformers ('hf') or mamba_ssm ('mamba_ssm') loads as it is.")
    out = convert(Mamba2LMHeadModel, cfg.src, cfg.dst, cfg.to, cfg.dtype, cfg.tokenizer)
    print(f"wrote {cfg.to} checkpoint to {out}")
    return 0


def generate_command(argv: list[str]) -> Optional[int]:
    from lit_mamba2.generation import GenerateConfig, generate_main

    cfg = parse_recipe(GenerateConfig, argv, "lit-mamba2 generate",
                       "Generate text from a checkpoint (a mamba_ssm or transformers folder, a Hub repo id, or a "
                       "training .ckpt), streaming tokens as they come.")
    return generate_main(cfg)


def evaluate_command(argv: list[str]) -> Optional[int]:
    from lit_mamba2.evals.run import EvaluateConfig, evaluate_main

    cfg = parse_recipe(EvaluateConfig, argv, "lit-mamba2 evaluate",
                       "Evaluate a checkpoint (folder, Hub repo id or training .ckpt) with lm-evaluation-harness: "
                       "by default the paper's zero-shot suite, with the paper's numbers beside.")
    return evaluate_main(cfg)


def prepare_command(argv: list[str]) -> Optional[int]:
    from lit_mamba2.training.prepare import PrepareConfig, prepare

    cfg = parse_recipe(PrepareConfig, argv, "lit-mamba2 prepare",
                       "Tokenize a corpus (JSONL, Parquet, text files, a Hugging Face dataset) into token shards: "
                       "<output>/train and <output>/val, each a folder for data.kind: tokens.")
    prepare(cfg)
    return 0


def push_command(argv: list[str]) -> Optional[int]:
    from lit_mamba2.hub import PushConfig, push_main

    cfg = parse_recipe(PushConfig, argv, "lit-mamba2 push",
                       "Publish a checkpoint (folder, Hub repo id or training .ckpt) on the Hugging Face Hub: the "
                       "weights in the hf or mamba_ssm format, its tokenizer, and a model card with the training "
                       "recipe and the evaluation results of lit-mamba2 evaluate (--results).")
    return push_main(cfg)


COMMANDS: dict[str, tuple[Callable[[list[str]], Optional[int]], str]] = {
    "prepare": (prepare_command, "tokenize a corpus (JSONL, Parquet, text, HF dataset) into train/val token shards"),
    "pretrain": (pretrain_command, "pretrain a model from a recipe (no arguments: the built-in CPU default)"),
    "finetune": (finetune_command, "fine-tune a checkpoint on instruction data (full or LoRA) from a recipe"),
    "convert": (convert_command, "convert a checkpoint (folder, Hub id or .ckpt) to the hf or mamba_ssm format"),
    "generate": (generate_command, "generate text from a checkpoint (folder, Hub id or .ckpt)"),
    "evaluate": (evaluate_command, "lm-evaluation-harness on a checkpoint (default: the paper's zero-shot suite)"),
    "push": (push_command, "publish a checkpoint on the Hugging Face Hub with a model card and its eval results"),
}


def usage() -> str:
    lines = ["usage: lit-mamba2 <command> [--config file.yaml] [--section.key value ...]", "", "commands:"]
    lines += [f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items()]
    lines += ["", "run `lit-mamba2 <command> --help` for a command's options"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from lit_mamba2.config import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        guess = difflib.get_close_matches(verb, list(COMMANDS), n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        print(f"lit-mamba2: unknown command {verb!r}{hint}; available: {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[verb][0](rest) or 0
    except UsageError as e:
        print(f"lit-mamba2 {verb}: error: {e}\n`lit-mamba2 {verb} --help` lists every option", file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError, ValueError) as e:  # bad input: the message names the field or file
        print(f"lit-mamba2 {verb}: error: {e}", file=sys.stderr)
        return 2
