"""The `lit-mamba2` command: one verb per job (`lit-mamba2 pretrain --config recipes/x.yaml --trainer.max_steps 20`).

A verb is a function taking its own argument list; adding one (finetune, evaluate, ...) is one entry in COMMANDS.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import Callable, Optional

PLANNED = ("finetune", "evaluate", "generate", "convert", "push")


def _recipe_parser(config_class, prog: str, description: str):
    """A jsonargparse parser whose keys are config_class's fields: --config <yaml> and dotted overrides."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    # no abbreviations: a misspelled key (--trainer.max_step) must be an error, not a prefix of another
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=True, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a recipe YAML (see recipes/)")
    parser.add_class_arguments(config_class, fail_untyped=True)
    return parser


def parse_recipe(config_class, argv: list[str], prog: str, description: str = ""):
    """argv -> an instance of config_class (recipe file first, then the overrides in order)."""
    parser = _recipe_parser(config_class, prog, description)
    init = parser.instantiate(parser.parse_args(argv))
    return config_class(**{f.name: init[f.name] for f in dataclasses.fields(config_class)})

def pretrain_command(argv: list[str]) -> Optional[int]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_mamba2.training.pretrain import PretrainConfig, pretrain

    cfg = parse_recipe(PretrainConfig, argv, "lit-mamba2 pretrain",
                       "Pretrain a Mamba-2 language model. With no arguments: the built-in default "
                       "(recipes/default.yaml): a small model on the Python standard library, on CPU, in minutes.")
    try:
        pretrain(cfg)
    except MisconfigurationException as e:  # e.g. an accelerator this machine does not have: bad input
        raise ValueError(str(e)) from None
    except SIGTERMException:  # (a SystemExit without a code: the shell would see success)
        print(f"lit-mamba2 pretrain: stopped by SIGTERM; {cfg.trainer.out_dir}/checkpoints/last.ckpt holds the "
              "last finished step (continue with --resume true)", file=sys.stderr)
        return 128 + signal.SIGTERM


def convert_command(argv: list[str]) -> Optional[int]:
    from lit_mamba2.checkpoints import convert_main

    return convert_main(argv)


def generate_command(argv: list[str]) -> Optional[int]:
    from lit_mamba2.generation import generate_main

    return generate_main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], Optional[int]], str]] = {
    "pretrain": (pretrain_command, "pretrain a model from a recipe (no arguments: the built-in CPU default)"),
    "convert": (convert_command, "convert a checkpoint (folder, Hub id or .ckpt) to the hf or mamba_ssm format"),
    "generate": (generate_command, "generate text from a checkpoint (folder, Hub id or .ckpt)"),
}


def usage() -> str:
    lines = ["usage: lit-mamba2 <command> [--config recipe.yaml] [--section.key value ...]", "", "commands:"]
    lines += [f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items()]
    lines += ["", f"planned: {', '.join(v for v in PLANNED if v not in COMMANDS)}",
              "run `lit-mamba2 <command> --help` for a command's options"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from lit_mamba2.config import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        if verb in PLANNED:
            print(f"lit-mamba2: '{verb}' is not implemented yet; available now: {', '.join(COMMANDS)}",
                  file=sys.stderr)
        else:
            print(f"lit-mamba2: unknown command {verb!r}; available: {', '.join(COMMANDS)}\n\n{usage()}",
                  file=sys.stderr)
        return 2
    try:
        return COMMANDS[verb][0](rest) or 0
    except (ConfigError, FileNotFoundError, ValueError) as e:  # bad input: the message names the field or file
        print(f"lit-mamba2 {verb}: error: {e}", file=sys.stderr)
        return 2
