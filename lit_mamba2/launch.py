"""What the launcher says about the run: `fabric run`'s LT_* variables, torchrun's and SLURM's process counts.

`fabric run [--accelerator A --devices N --num-nodes M --precision P --strategy S] script ...` starts torchrun and
exports LT_DEVICES and LT_NUM_NODES (always; "auto" when not given) and LT_ACCELERATOR, LT_PRECISION, LT_STRATEGY
when given: those win over the recipe. Under torchrun or srun the launcher has already started the processes, so
devices per node and the node count are what it started (Lightning checks them against WORLD_SIZE / SLURM_NTASKS),
unless LT_DEVICES / LT_NUM_NODES name them (LT_DEVICES may list GPU ids).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Mapping, Optional, Union

LT_VARIABLES = {"LT_ACCELERATOR": "accelerator", "LT_DEVICES": "devices", "LT_NUM_NODES": "num_nodes",
                "LT_PRECISION": "precision", "LT_STRATEGY": "strategy"}


def _parse_devices(value: str) -> Union[int, str]:
    return int(value) if value.strip().isdigit() else value


def launched_processes(env: Mapping[str, str]) -> Optional[tuple[int, int]]:
    """(processes per node, nodes) started by torchrun / fabric run or by srun; None when not launched by one."""
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        return local, max(1, world // max(1, local))
    # Lightning's SLURM detection: SLURM_NTASKS set and not an interactive allocation's shell
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
        return int(env["SLURM_NTASKS"]) // nodes, nodes
    return None


def launcher_overrides(env: Mapping[str, str]) -> dict:
    """Trainer fields set by the environment: {accelerator, devices, num_nodes, precision, strategy} (a subset)."""
    out: dict = {}
    for var, name in LT_VARIABLES.items():
        value = env.get(var, "")
        if value in ("", "auto") and name in ("devices", "num_nodes"):
            continue
        if value:
            out[name] = {"devices": _parse_devices, "num_nodes": int}.get(name, str)(value)
    launched = launched_processes(env)
    if launched is not None:
        out.setdefault("devices", launched[0])
        out.setdefault("num_nodes", launched[1])
    return out


def apply_launcher_env(trainer_config, env: Mapping[str, str] = os.environ):
    """A copy of trainer_config (a dataclass with accelerator, devices, num_nodes, precision, strategy fields) with
    the launcher's settings applied."""
    return replace(trainer_config, **launcher_overrides(env))
