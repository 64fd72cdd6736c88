"""Published checkpoints in and out: mamba_ssm's and transformers' formats, Lightning training checkpoints, the Hub.

Formats, told apart by config.json:
- mamba_ssm: `d_model`, `n_layer`, `ssm_cfg`, `attn_layer_idx`, ... (MambaConfig) + pytorch_model.bin (or
  safetensors). Parameter names are ours already.
- transformers: `model_type: "mamba2"` (hidden_size, num_heads, state_size, ...) + model.safetensors (single or
  sharded with model.safetensors.index.json). Names differ only in `backbone.embeddings` (ours: `embedding`).
- a Lightning `.ckpt` from `lit-mamba2 pretrain`: the model config and tokenizer stored beside `state_dict`.

Weights are read by safetensors or `torch.load(weights_only=True)`: nothing arbitrary is unpickled. Every key is
checked before any is used: a missing, unexpected or wrongly shaped tensor, or an unreadable file, stops the load
with a message naming it.

Entry points: `load(model_class, name_or_path)` returns what it read, explicitly: `Loaded(model, tokenizer, format,
path)`; `save(model, folder, format, tokenizer)` writes a folder for transformers or mamba_ssm; `convert` is the two
in a row. This module never imports lit_mamba2.model: the class to build is an argument (the model's
`from_pretrained` / `save_pretrained` pass their own), so the dependency runs one way, model -> checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lit_mamba2.config import ConfigError, Mamba2Config, SSMConfig
from lit_mamba2.lora import is_adapter_key, merge_state_dict
from lit_mamba2.tokenizers import HFTokenizer, Tokenizer, check_vocab_fits, load_tokenizer, tokenizer_from_state

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")
# The tokenizer every published state-spaces Mamba-2 checkpoint was trained with (vocabulary 50277).
PUBLISHED_TOKENIZER = "EleutherAI/gpt-neox-20b"
PUBLISHED_VOCAB_SIZE = 50277
# ... and as transformers-format copies store it: padded to a multiple of 8 or 16
_PUBLISHED_VOCAB_SIZES = (PUBLISHED_VOCAB_SIZE, 50280, 50288)
FORMATS = ("hf", "mamba_ssm")
# mamba_ssm's MambaConfig fields: the only keys its from_pretrained accepts
_MAMBA_SSM_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                     "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")
_MAMBA_SSM_PAD_DEFAULT = 8  # MambaConfig's default, not ours
_MAMBA_SSM_RUNTIME_KEYS = ("use_mem_eff_path", "sequence_parallel")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written; the message names the file and key."""


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------
def detect_format(config: dict, where: str = CONFIG_NAME) -> str:
    """"hf" for transformers' Mamba-2 config, "mamba_ssm" for mamba_ssm's (and ours, a superset of it)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: holds a JSON {type(config).__name__}, expected an object of config fields")
    if "model_type" in config:
        if config["model_type"] != "mamba2":
            raise CheckpointError(f"{where}: unknown model_type {config['model_type']!r}; only 'mamba2' "
                                  "(transformers' Mamba2ForCausalLM) or a mamba_ssm config (d_model, n_layer, ssm_cfg) "
                                  "can be loaded")
        return "hf"
    if "d_model" in config and "n_layer" in config:
        return "mamba_ssm"
    raise CheckpointError(f"{where}: neither a transformers Mamba-2 config (model_type 'mamba2') nor a mamba_ssm "
                          f"config (d_model, n_layer, ssm_cfg); keys present: {sorted(config)[:12]}")


def _json_float(v, what: str) -> float:
    """A float as JSON writers spell it: a number, "Infinity"/"inf", or transformers 5's {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    try:
        return float(v)
    except (TypeError, ValueError):
        raise CheckpointError(f"{what}: {v!r} is not a number") from None


def config_from_hf(hf: dict, where: str = CONFIG_NAME) -> Mamba2Config:
    """transformers' Mamba2Config (as JSON) -> ours. Defaults are transformers' where a key is absent."""
    def get(key, default):
        return hf.get(key, default)

    hidden, expand = get("hidden_size", 4096), get("expand", 2)
    num_heads, head_dim = get("num_heads", 128), get("head_dim", 64)
    if num_heads * head_dim != int(expand * hidden):
        raise CheckpointError(f"{where}: num_heads * head_dim = {num_heads * head_dim} must equal expand * hidden_size "
                              f"= {int(expand * hidden)}")
    if get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Mamba-2 uses 'silu')")
    limit = get("time_step_limit", (0.0, math.inf))
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
        raise CheckpointError(f"{where}: time_step_limit must be a pair [low, high], got {limit!r}")
    limit = tuple(_json_float(v, f"{where}: time_step_limit") for v in limit)
    try:
        ssm_cfg = SSMConfig(d_state=get("state_size", 128), d_conv=get("conv_kernel", 4), expand=expand,
                            headdim=head_dim, ngroups=get("n_groups", 8), chunk_size=get("chunk_size", 256),
                            bias=get("use_bias", False), conv_bias=get("use_conv_bias", True),
                            dt_min=get("time_step_min", 0.001), dt_max=get("time_step_max", 0.1),
                            dt_init_floor=get("time_step_floor", 1e-4), dt_limit=limit)
        # transformers always gates before a grouped norm, with D per head: the mamba_ssm defaults, kept as they are
        return Mamba2Config(d_model=hidden, n_layer=get("num_hidden_layers", 64), vocab_size=get("vocab_size", 32768),
                            d_intermediate=0, ssm_cfg=ssm_cfg, residual_in_fp32=get("residual_in_fp32", True),
                            pad_vocab_size_multiple=1, tie_embeddings=get("tie_word_embeddings", False),
                            norm_epsilon=get("layer_norm_epsilon", 1e-5),
                            initializer_range=get("initializer_range", 0.02))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_to_hf(config: Mamba2Config, dtype: torch.dtype, tokenizer: Optional[Tokenizer] = None) -> dict:
    """Ours -> transformers' Mamba2Config JSON; refuses what Mamba2ForCausalLM cannot express. The special token
    ids are the tokenizer's (transformers' defaults 0 / 1 / 2 are not this vocabulary's); none without one."""
    s = config.ssm
    problems = []
    if config.attn_layer_idx:
        problems.append(f"attention layers (attn_layer_idx = {config.attn_layer_idx})")
    if config.d_intermediate:
        problems.append(f"MLP blocks (d_intermediate = {config.d_intermediate})")
    if config.d_ssm != config.d_inner:
        problems.append(f"d_ssm = {config.d_ssm} < d_inner = {config.d_inner}")
    if s.D_has_hdim:
        problems.append("D_has_hdim = True")
    if not s.rmsnorm or s.norm_before_gate:
        problems.append("a mixer norm other than gate-then-RMSNorm (rmsnorm / norm_before_gate)")
    if problems:
        raise CheckpointError("format 'hf' (transformers' Mamba2ForCausalLM) cannot express this model: "
                              + "; ".join(problems)
                              + ". Save with format='mamba_ssm' (lit-mamba2 convert --to mamba_ssm) instead")
    hf = {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer, "vocab_size": config.padded_vocab_size,
        "num_heads": config.nheads, "head_dim": s.headdim, "state_size": s.d_state, "n_groups": s.ngroups,
        "expand": s.expand, "conv_kernel": s.d_conv, "chunk_size": s.chunk_size,
        "time_step_min": s.dt_min, "time_step_max": s.dt_max,
        "time_step_floor": s.dt_init_floor, "use_bias": s.bias, "use_conv_bias": s.conv_bias,
        "hidden_act": "silu", "layer_norm_epsilon": config.norm_epsilon, "residual_in_fp32": config.residual_in_fp32,
        "rms_norm": True, "norm_before_gate": False, "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range, "dtype": str(dtype).removeprefix("torch."),
    }
    if s.dt_limit != SSMConfig().dt_limit:  # the default (0, inf) is transformers' too, and JSON
        hf["time_step_limit"] = list(s.dt_limit)  # has no infinity that every reader accepts
    if tokenizer is not None:
        hf.update(eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id)
    return hf


def config_from_mamba_ssm(d: dict, where: str = CONFIG_NAME) -> Mamba2Config:
    """mamba_ssm's MambaConfig (as JSON) -> ours, read as mamba_ssm reads it: a missing pad_vocab_size_multiple is
    8, a missing ssm_cfg.layer means Mamba-1 (refused), a missing attn_cfg.causal means non-causal attention
    (mamba_ssm's MHA default; loaded causal, with a warning)."""
    d = dict(d)
    d.setdefault("pad_vocab_size_multiple", _MAMBA_SSM_PAD_DEFAULT)
    ssm_cfg = d.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise CheckpointError(f"{where}: ssm_cfg must be an object, got {ssm_cfg!r}")
    if "layer" not in ssm_cfg:
        raise CheckpointError(f"{where}: ssm_cfg has no 'layer', which mamba_ssm reads as a Mamba-1 model; "
                              "lit-mamba2 loads Mamba-2 models only (ssm_cfg.layer = 'Mamba2')")
    # mamba_ssm's Mamba2 arguments that choose a code path or sharding, not the function
    d["ssm_cfg"] = {k: v for k, v in ssm_cfg.items() if k not in _MAMBA_SSM_RUNTIME_KEYS}
    attn_cfg = d.get("attn_cfg") or {}
    if d.get("attn_layer_idx") and isinstance(attn_cfg, dict) and "causal" not in attn_cfg:
        warnings.warn(f"{where}: attn_cfg has no 'causal' key, so mamba_ssm would build these attention layers "
                      "non-causal (its MHA's default); they are loaded as causal attention, as a language model's "
                      "must be")
    try:
        return Mamba2Config.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_to_mamba_ssm(config: Mamba2Config) -> dict:
    if config.norm_epsilon != 1e-5:
        raise CheckpointError(f"format 'mamba_ssm' fixes the norm epsilon at 1e-5; this model has norm_epsilon = "
                              f"{config.norm_epsilon}")
    # ssm_cfg / attn_cfg as mamba_ssm reads them: what differs from its defaults, the layer and (for attention
    # layers, non-causal in mamba_ssm unless told) causal always said; infinity as Python's json writes it
    d = config.to_dict(inf=math.inf)
    return json.loads(json.dumps({k: d[k] for k in _MAMBA_SSM_FIELDS}))


# ---------------------------------------------------------------------------------------------------------------
# reading weights
# ---------------------------------------------------------------------------------------------------------------
def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} (truncated or not a safetensors file): {e}") from None


def _load_torch(path: Path) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        kind = type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path} holds Python objects other than tensors, which are not unpickled for "
                                  f"safety ({kind}: {str(e).splitlines()[0]})") from None
        raise CheckpointError(f"cannot read {path} (truncated or not a PyTorch file): {kind}: {e}") from None


def _plain_tensors(sd: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, expected a dict of tensors (a state dict)")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is a {type(sd[bad[0]]).__name__}, not a tensor")
    return sd


# Which weight files each tool reads, in its order: transformers prefers safetensors, mamba_ssm reads
# pytorch_model.bin (ours falls back to the other files). A folder holding several reads like its own tool would.
_WEIGHT_ORDER = {"hf": (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME),
                 "mamba_ssm": (TORCH_NAME, TORCH_INDEX_NAME, SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME)}


def _shard_map(index: Path) -> dict[str, str]:
    """An index file's weight_map: {tensor name: shard file name}."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    return weight_map


def weight_files(folder: Path, fmt: str) -> list[str]:
    """The files the load reads, index first for a sharded checkpoint ([] when there are none)."""
    for name in _WEIGHT_ORDER[fmt]:
        if (folder / name).exists():
            if name.endswith(".index.json"):
                return [name, *sorted(set(_shard_map(folder / name).values()))]
            return [name]
    return []


def read_weights(folder: Path, fmt: str = "hf") -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a checkpoint folder, and the file (or index) they came from."""
    files = weight_files(folder, fmt)
    if not files:
        raise CheckpointError(f"{folder} has no weights: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or "
                              f"{TORCH_NAME}")
    first = folder / files[0]
    loader = _load_safetensors if ".safetensors" in files[0] else _load_torch
    if len(files) == 1 and not files[0].endswith(".index.json"):
        sd = loader(first)
        return (sd if loader is _load_safetensors else _plain_tensors(sd, first)), str(first)
    weight_map = _shard_map(first)
    sd: dict[str, torch.Tensor] = {}
    came_from: dict[str, str] = {}
    for shard in files[1:]:
        if not (folder / shard).exists():
            raise CheckpointError(f"{first} names shard {shard!r}, which is missing from {folder}")
        for k, v in _plain_tensors(loader(folder / shard), folder / shard).items():
            if k in sd:
                raise CheckpointError(f"{first}: key {k!r} is held by two shards, {came_from[k]!r} and {shard!r}")
            sd[k], came_from[k] = v, shard
    absent = [k for k in weight_map if k not in sd]
    if absent:
        raise CheckpointError(f"{first}: key {absent[0]!r} is listed for shard {weight_map[absent[0]]!r} "
                              "but that shard does not hold it")
    return sd, str(first)


def hf_to_ours(name: str) -> str:
    return name.replace("backbone.embeddings.", "backbone.embedding.", 1)


def ours_to_hf(name: str) -> str:
    return name.replace("backbone.embedding.", "backbone.embeddings.", 1)


# ---------------------------------------------------------------------------------------------------------------
# building the model
# ---------------------------------------------------------------------------------------------------------------
def build_model(model_class: type[torch.nn.Module], config: Mamba2Config, state_dict: dict[str, torch.Tensor],
                source: str, dtype: Optional[torch.dtype] = None, device=None) -> torch.nn.Module:
    """A `model_class(config)` holding exactly `state_dict` (our names), in eval mode. Every key and shape is
    checked before anything is assigned; a tied lm_head.weight may be absent (and is ignored when present)."""
    with torch.device("meta"):
        model = model_class(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = dict(state_dict)
    if config.tie_embeddings:
        head = sd.pop("lm_head.weight", None)
        emb = sd.get("backbone.embedding.weight")
        if head is not None and emb is not None and head.shape == emb.shape and not torch.equal(head, emb):
            warnings.warn(f"{source}: lm_head.weight differs from the embedding but the config ties them "
                          "(tie_embeddings); the embedding is used for both")
        expected.pop("lm_head.weight")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more: {missing[1:4]}...)" if len(missing) > 1 else ""))
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r}" +
                              (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") +
                              "; the config does not describe these weights")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {tuple(sd[k].shape)}, the config expects "
                                  f"{tuple(shape)}")
        if not sd[k].is_floating_point():
            raise CheckpointError(f"{source}: key {k!r} holds {sd[k].dtype} values; the model's weights are floats")
    dtype = dtype or torch.float32
    sd = {k: v.to(device=device or "cpu", dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    return model.eval()


def read_config(folder: Path) -> tuple[Mamba2Config, str]:
    """A checkpoint folder's model config and its format ("hf" or "mamba_ssm")."""
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    fmt = detect_format(raw, str(cfg_path))
    config = config_from_hf(raw, str(cfg_path)) if fmt == "hf" else config_from_mamba_ssm(raw, str(cfg_path))
    return config, fmt


def read_folder(folder: str | os.PathLike) -> tuple[Mamba2Config, dict[str, torch.Tensor], str, str]:
    """A mamba_ssm or transformers folder: its config, its weights under our names, the format and the file the
    weights came from."""
    folder = Path(folder)
    config, fmt = read_config(folder)
    sd, source = read_weights(folder, fmt)
    if fmt == "hf":
        renamed = {hf_to_ours(k): v for k, v in sd.items()}
        if len(renamed) < len(sd):  # a name that transformers' and ours both spell, held twice
            clash = next(k for k in sd if hf_to_ours(k) != k and hf_to_ours(k) in sd)
            raise CheckpointError(f"{source}: holds both {clash!r} and {hf_to_ours(clash)!r}; one is unexpected")
        sd = renamed
    return config, sd, fmt, source


def read_training_checkpoint(path: str | os.PathLike, merge_adapters: bool = True
                             ) -> tuple[Mamba2Config, dict[str, torch.Tensor], Any]:
    """The one reader of a Lightning .ckpt from training: its model config, the model's weights (our names) and
    the stored tokenizer state (None if none). The config and tokenizer are top-level "model_config" and
    "tokenizer" entries (what `lit-mamba2 pretrain` writes), or under a "lit_mamba2" key or "hyper_parameters" as
    {"model_config": dict, "tokenizer": ...}; the weights are `state_dict` with the LightningModule's "model."
    prefix. LoRA adapters (`lit-mamba2 finetune --method lora`, with their "lora" entry) are merged into the
    weights, unless `merge_adapters` is False."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        ckpt = _read_sharded_checkpoint(path)
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    else:
        ckpt = _load_torch(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    meta = ckpt if "model_config" in ckpt else None  # what LanguageModel.on_save_checkpoint writes
    for where in ("lit_mamba2", "hyper_parameters"):
        if meta is not None:
            break
        block = ckpt.get(where)
        if isinstance(block, dict) and isinstance(block.get("lit_mamba2"), dict):
            block = block["lit_mamba2"]
        if isinstance(block, dict) and "model_config" in block:
            meta = block
            break
    if meta is None:
        raise CheckpointError(f"{path}: no model config found (expected 'model_config' under the top-level "
                              "'lit_mamba2' key or under 'hyper_parameters')")
    mc = meta["model_config"]
    try:
        config = mc if isinstance(mc, Mamba2Config) else Mamba2Config.from_dict(dict(mc))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: model_config: {e}") from None
    sd = {}
    for k, v in ckpt["state_dict"].items():
        if not k.startswith("model."):
            continue  # metrics and other module state, not the model
        sd[k[len("model."):].replace("_orig_mod.", "")] = v
    if not sd:
        raise CheckpointError(f"{path}: state_dict has no 'model.'-prefixed keys")
    if merge_adapters and any(is_adapter_key(k) for k in sd):
        lora = meta.get("lora")
        if not isinstance(lora, dict) or not {"rank", "alpha"} <= set(lora):
            raise CheckpointError(f"{path}: holds LoRA adapters but no 'lora' entry giving their rank and alpha")
        try:
            sd = merge_state_dict(sd, lora["alpha"] / lora["rank"])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return config, sd, meta.get("tokenizer", ckpt.get("tokenizer"))


# ---------------------------------------------------------------------------------------------------------------
# tokenizers (lit_mamba2.tokenizers: one interface, one rebuild from a checkpoint's state)
# ---------------------------------------------------------------------------------------------------------------
def has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def _tokenizer(make, what: str = "") -> Tokenizer:
    """A tokenizer made by `make()`; a failure is a CheckpointError naming `what` and how to do without it."""
    try:
        return make()
    except (ValueError, ImportError) as e:
        raise CheckpointError(f"{what + ': ' if what else ''}{e}; name another (tokenizer=NAME, --tokenizer NAME) "
                              "or load without one (tokenizer=False)") from None


# ---------------------------------------------------------------------------------------------------------------
# the Hub
# ---------------------------------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def resolve(name_or_path: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """A local folder as it is; otherwise a Hub repo id, downloaded (config, weights, tokenizer files) into
    huggingface_hub's cache, or found there alone when HF_HUB_OFFLINE=1. HF_TOKEN is used for private repos."""
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_dir():
        return p
    s = str(name_or_path)
    if s.endswith(".ckpt") and not p.exists():
        raise CheckpointError(f"{s}: no such file")
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise CheckpointError(f"{s}: not a checkpoint folder (and not a Hub repo id 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("loading from the Hub needs huggingface_hub: pip install huggingface-hub") from None
    offline = _env_flag("HF_HUB_OFFLINE")

    def download(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(s, revision=revision, allow_patterns=patterns,
                                          cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline,
                                          token=os.environ.get("HF_TOKEN") or None))
        except Exception as e:  # noqa: BLE001 - network, auth and cache errors come in many types
            hint = " (HF_HUB_OFFLINE=1: only the local cache was searched)" if offline else ""
            raise CheckpointError(f"{s!r} is not a local folder, and cannot be fetched (revision "
                                  f"{revision or 'main'}) from the Hugging Face Hub{hint}: {type(e).__name__}: "
                                  f"{e}") from None

    # First the config, the indexes and the tokenizer; then only the weight files the load will read (repos often
    # hold a format twice, e.g. pytorch_model.bin beside model.safetensors, or consolidated.safetensors beside
    # shards), each matched by its exact name in the repo's root.
    folder = download([CONFIG_NAME, SAFETENSORS_INDEX_NAME, TORCH_INDEX_NAME, *TOKENIZER_FILES])
    if offline or not (folder / CONFIG_NAME).exists():
        return folder  # offline: the cache holds what it holds; no config: read_folder says so
    try:
        fmt = detect_format(json.loads((folder / CONFIG_NAME).read_text()))
    except (json.JSONDecodeError, CheckpointError):
        return folder  # read_folder reports it, naming the file
    for name in _WEIGHT_ORDER[fmt]:
        if name.endswith(".index.json"):
            if (folder / name).exists():
                download(weight_files(folder, fmt))
                break
        else:
            download([name])
            if (folder / name).exists():
                break
    return folder


# ---------------------------------------------------------------------------------------------------------------
# public entry points: load, save, convert
# ---------------------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch.dtype, or its name ("bfloat16", "torch.bfloat16")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise CheckpointError(f"dtype must be one of {sorted(DTYPES)} (or the torch.dtype), got {dtype!r}")


def _is_training_checkpoint(name_or_path) -> bool:
    path = Path(name_or_path)
    return str(name_or_path).endswith(".ckpt") and (path.is_file() or is_sharded_checkpoint(path))


def is_sharded_checkpoint(path) -> bool:
    """A checkpoint folder written under trainer.strategy fsdp: torch.distributed.checkpoint's shards and
    .metadata, and Lightning's meta.pt with everything else (loops, model config, tokenizer)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def partial_path(path: Path) -> Path:
    """Where a checkpoint folder is written before it is complete."""
    return path.with_name(f".{path.name}.partial")


def previous_path(path: Path) -> Path:
    """Where the checkpoint it replaces waits while the new one is renamed into place."""
    return path.with_name(f".{path.name}.previous")


def _read_sharded_checkpoint(path: Path) -> dict:
    """A sharded checkpoint read whole in this one process (any number of ranks wrote it)."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    try:
        ckpt = _load_distributed_checkpoint(path)
        ckpt.update(torch.load(path / "meta.pt", map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - missing or truncated shards fail in many ways
        raise CheckpointError(f"{path}: cannot read the sharded checkpoint ({type(e).__name__}: {e})") from None
    return ckpt


@dataclass(frozen=True)
class Loaded:
    """What `load` read: the model (eval mode), its tokenizer (None when there is none or none was asked for),
    the format read ("hf", "mamba_ssm" or "ckpt") and the folder or .ckpt file it came from (for a Hub repo id,
    its folder in the Hub cache)."""

    model: torch.nn.Module
    tokenizer: Optional[Tokenizer]
    format: str
    path: Path


def load(model_class: type[torch.nn.Module], name_or_path: str | os.PathLike, *, revision: Optional[str] = None,
         dtype=None, device=None, tokenizer=None) -> Loaded:
    """Build a `model_class` (Mamba2LMHeadModel) from a mamba_ssm- or transformers-format checkpoint (folder or Hub
    repo id) or a `lit-mamba2 pretrain` .ckpt, and its tokenizer.

    dtype: the parameters' dtype (a torch.dtype or its name; default float32). tokenizer: None for the
    checkpoint's own (a .ckpt's stored one, a folder's tokenizer files, else for the published vocabulary the
    GPT-NeoX tokenizer), False for none, or one to use instead ("byte", a Hugging Face name or folder, a
    Tokenizer or a transformers tokenizer); a tokenizer larger than the model's vocabulary is refused.
    """
    dtype = as_dtype(dtype)
    stored = None
    if _is_training_checkpoint(name_or_path):
        path, fmt = Path(name_or_path), "ckpt"
        config, sd, stored = read_training_checkpoint(path)
        source = str(path)
    else:
        path = resolve(name_or_path, revision)
        config, sd, fmt, source = read_folder(path)
    model = build_model(model_class, config, sd, source, dtype, device)
    del sd
    tok = None
    if tokenizer is False:
        pass
    elif tokenizer is not None:
        tok = _tokenizer(lambda: load_tokenizer(tokenizer))
    elif fmt == "ckpt":
        tok = _tokenizer(lambda: tokenizer_from_state(stored), f"{path}: its stored tokenizer")
    elif has_tokenizer_files(path):
        tok = _tokenizer(lambda: load_tokenizer(path), f"{path}: its tokenizer files")
    elif config.vocab_size in _PUBLISHED_VOCAB_SIZES:
        try:
            tok = load_tokenizer(PUBLISHED_TOKENIZER)
        except (ValueError, ImportError) as e:  # offline or not installed: the model is still usable
            warnings.warn(f"no tokenizer in {path}, and {PUBLISHED_TOKENIZER} could not be loaded ({e}); "
                          "pass tokenizer=NAME")
    if tok is not None:
        try:
            check_vocab_fits(tok, config.padded_vocab_size, "the model's embedding rows",
                             "it cannot be this model's tokenizer: pass the one the model was trained with "
                             "(tokenizer=NAME, --tokenizer NAME)")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return Loaded(model, tok, fmt, path)


def _weight_file_names(folder: Path) -> list[Path]:
    names = [folder / n for n in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME)]
    shards = [*folder.glob("model-*-of-*.safetensors"), *folder.glob("pytorch_model-*-of-*.bin")]
    return [p for p in names if p.is_file()] + sorted(shards)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """safetensors writes a temporary file and renames it, which leaves it 0600 whatever the umask; the file gets
    the mode an ordinary open() would have given it (0644 under the usual umask 022)."""
    from safetensors.torch import save_file

    with open(path, "wb"):  # created as any file is: 0666 less the umask (and a folder's default ACL)
        pass
    mode = path.stat().st_mode & 0o777
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, mode)


def save(model: torch.nn.Module, folder: str | os.PathLike, format: str = "hf", tokenizer=None) -> Path:
    """Write `folder` for the other tool: "hf" = config.json + model.safetensors for transformers'
    Mamba2ForCausalLM (pure Mamba-2 only); "mamba_ssm" = config.json + pytorch_model.bin for mamba_ssm's
    MambaLMHeadModel. A tokenizer ("byte", a name or folder, a Tokenizer or a transformers tokenizer) is saved
    beside them. Weight files of an earlier save in the folder (either format, sharded or not) are removed, so
    that no reader finds stale weights before the new ones. Files get ordinary permissions (as open() gives)."""
    if format not in FORMATS:
        raise CheckpointError(f"format must be one of {FORMATS}, got {format!r}")
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: save the module it wraps
    config = model.config
    try:
        tok = None if tokenizer is None else load_tokenizer(tokenizer)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    dtype = model.lm_head.weight.dtype
    # Validate before writing anything, so that a refused format leaves no half-written folder.
    cfg = config_to_hf(config, dtype, tok) if format == "hf" else config_to_mamba_ssm(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in _weight_file_names(folder):
        stale.unlink()
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if config.tie_embeddings:  # one tensor under both names: torch.save then stores it once
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    if format == "hf":
        if config.tie_embeddings:
            sd.pop("lm_head.weight")  # transformers ties it back; safetensors refuses shared tensors
        _save_safetensors({ours_to_hf(k): v for k, v in sd.items()}, folder / SAFETENSORS_NAME, {"format": "pt"})
    else:
        torch.save(sd, folder / TORCH_NAME)  # lm_head.weight included: mamba_ssm loads strictly
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    if tok is not None:
        tok.save_pretrained(folder)
        if not isinstance(tok, HFTokenizer):
            warnings.warn("the tokenizer is the built-in byte tokenizer: no tokenizer files are written "
                          "(generate with --tokenizer byte)")
    return folder


@dataclass
class ConvertConfig:
    """The options of `lit-mamba2 convert` (a checkpoint into a folder for transformers or mamba_ssm).

    Args:
        src: checkpoint folder, Hub repo id (org/name) or training .ckpt
        dst: output folder (new or empty)
        to: output format
        dtype: parameter dtype to write (default: float32)
        tokenizer: tokenizer name or folder to copy in, or 'byte' (default: the source's own)
    """

    src: str
    dst: str
    to: Literal["hf", "mamba_ssm"]
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    tokenizer: Optional[str] = None


def convert(model_class: type[torch.nn.Module], src: str | os.PathLike, dst: str | os.PathLike, to: str,
            dtype=None, tokenizer=None) -> Path:
    """`load` then `save`: the checkpoint `src` as a new `dst` folder in format `to`, with src's tokenizer (or
    `tokenizer`). Refuses a `dst` that is a file or a folder holding anything, before reading the weights."""
    if to not in FORMATS:
        raise CheckpointError(f"--to must be one of {FORMATS}, got {to!r}")
    out = Path(dst)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{dst} is a file; the output is a folder (new or empty)")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; choose a new folder")
    created = not out.exists()
    if not _is_training_checkpoint(src):
        src = resolve(src)
        if to == "hf":  # refuse before the (possibly long) read of the weights
            config_to_hf(read_config(Path(src))[0], torch.float32)
    loaded = load(model_class, src, dtype=dtype, tokenizer=tokenizer)
    try:
        return save(loaded.model, out, to, tokenizer=loaded.tokenizer)
    except CheckpointError:
        if created and out.exists() and not any(out.iterdir()):
            shutil.rmtree(out)
        raise
