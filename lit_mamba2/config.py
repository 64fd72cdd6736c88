"""Model configuration: mamba_ssm's config.json field names, Mamba-2 defaults, presets and validation."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

# Mamba-2 mixer defaults (mamba_ssm.modules.mamba2.Mamba2). Keys absent from a config's ssm_cfg take these values.
SSM_DEFAULTS: dict[str, Any] = {
    "layer": "Mamba2",
    "d_state": 128,
    "d_conv": 4,
    "expand": 2,
    "headdim": 64,
    "d_ssm": None,  # None: the whole d_inner goes through the SSM
    "ngroups": 1,
    "A_init_range": (1.0, 16.0),
    "D_has_hdim": False,
    "rmsnorm": True,
    "norm_before_gate": False,
    "dt_min": 0.001,
    "dt_max": 0.1,
    "dt_init_floor": 1e-4,
    "dt_limit": (0.0, math.inf),
    "bias": False,
    "conv_bias": True,
    "conv_init": None,
    "chunk_size": 256,
}

# Attention mixer defaults (mamba_ssm.modules.mha.MHA as built by mamba_ssm's create_block).
ATTN_DEFAULTS: dict[str, Any] = {
    "num_heads": None,
    "num_heads_kv": None,  # None: as many as num_heads (plain multi-head attention)
    "head_dim": None,  # None: d_model // num_heads
    "mlp_dim": 0,
    "qkv_proj_bias": True,
    "out_proj_bias": True,
    "softmax_scale": None,  # None: 1/sqrt(head_dim)
    "causal": True,
    "d_conv": 0,
    "rotary_emb_dim": 0,
    "rotary_emb_base": 10000.0,
    "rotary_emb_interleaved": False,
}

# Keys of mamba_ssm's config.json that we accept but that change nothing here.
_IGNORED_KEYS = {"fused_add_norm"}


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model; the message names the field."""


@dataclass
class Mamba2Config:
    """A Mamba-2 or hybrid Mamba-2/attention language model, as mamba_ssm's `MambaConfig` spells it.

    `ssm_cfg` and `attn_cfg` hold only the keys given; the defaults above fill the rest (see `ssm` and `attn`).
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True  # accepted for compatibility; the plain PyTorch path has nothing to fuse
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self):
        self.ssm_cfg = dict(self.ssm_cfg or {})
        self.attn_cfg = dict(self.attn_cfg or {})
        self.attn_layer_idx = sorted(int(i) for i in (self.attn_layer_idx or []))
        for key in ("A_init_range", "dt_limit"):
            if key in self.ssm_cfg and self.ssm_cfg[key] is not None:
                self.ssm_cfg[key] = tuple(float(v) for v in self.ssm_cfg[key])
        self.validate()

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def ssm(self) -> dict:
        """The Mamba-2 mixer's settings: ssm_cfg over the defaults."""
        return {**SSM_DEFAULTS, **self.ssm_cfg}

    @property
    def attn(self) -> dict:
        """The attention mixer's settings, with num_heads_kv and head_dim resolved."""
        cfg = {**ATTN_DEFAULTS, **self.attn_cfg}
        if cfg["num_heads"] is not None:
            if cfg["num_heads_kv"] is None:
                cfg["num_heads_kv"] = cfg["num_heads"]
            if cfg["head_dim"] is None:
                cfg["head_dim"] = self.d_model // cfg["num_heads"]
        return cfg

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size if m <= 1 else math.ceil(self.vocab_size / m) * m

    @property
    def d_inner(self) -> int:
        return self.ssm["expand"] * self.d_model

    @property
    def d_ssm(self) -> int:
        d_ssm = self.ssm["d_ssm"]
        return self.d_inner if d_ssm is None else d_ssm

    @property
    def nheads(self) -> int:
        return self.d_ssm // self.ssm["headdim"]

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ConfigError(f"Mamba2Config.{name}: {msg}")

        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        need(isinstance(self.d_intermediate, int) and self.d_intermediate >= 0, "d_intermediate",
             f"must be a non-negative integer, got {self.d_intermediate!r}")

        unknown = set(self.ssm_cfg) - set(SSM_DEFAULTS)
        need(not unknown, "ssm_cfg", f"unknown key(s) {sorted(unknown)}; valid keys: {sorted(SSM_DEFAULTS)}")
        s = self.ssm
        need(s["layer"] == "Mamba2", "ssm_cfg.layer",
             f"must be 'Mamba2' (this package builds Mamba-2 models only), got {s['layer']!r}")
        for key in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            need(isinstance(s[key], int) and s[key] > 0, f"ssm_cfg.{key}", f"must be a positive integer, got {s[key]!r}")
        need(s["d_conv"] >= 2, "ssm_cfg.d_conv", f"must be at least 2, got {s['d_conv']}")
        if s["d_ssm"] is not None:
            need(isinstance(s["d_ssm"], int) and 0 < s["d_ssm"] <= self.d_inner, "ssm_cfg.d_ssm",
                 f"must be a positive integer no larger than expand * d_model = {self.d_inner}, got {s['d_ssm']!r}")
        need(self.d_ssm % s["headdim"] == 0, "ssm_cfg.headdim",
             f"d_ssm = {self.d_ssm} is not divisible by headdim = {s['headdim']}")
        need(self.nheads % s["ngroups"] == 0, "ssm_cfg.ngroups",
             f"nheads = {self.nheads} (d_ssm / headdim) is not divisible by ngroups = {s['ngroups']}")
        need(self.d_ssm % s["ngroups"] == 0, "ssm_cfg.ngroups", f"d_ssm = {self.d_ssm} is not divisible by ngroups")
        lo, hi = s["A_init_range"]
        need(0 < lo <= hi, "ssm_cfg.A_init_range", f"must satisfy 0 < low <= high, got {s['A_init_range']}")
        need(0 < s["dt_min"] <= s["dt_max"], "ssm_cfg.dt_min", f"must satisfy 0 < dt_min <= dt_max, got "
             f"({s['dt_min']}, {s['dt_max']})")
        lo, hi = s["dt_limit"]
        need(0 <= lo < hi, "ssm_cfg.dt_limit", f"must satisfy 0 <= low < high, got {s['dt_limit']}")

        need(all(0 <= i < self.n_layer for i in self.attn_layer_idx), "attn_layer_idx",
             f"indices must lie in [0, n_layer={self.n_layer}), got {self.attn_layer_idx}")
        need(len(set(self.attn_layer_idx)) == len(self.attn_layer_idx), "attn_layer_idx", "has repeated indices")
        unknown = set(self.attn_cfg) - set(ATTN_DEFAULTS)
        need(not unknown, "attn_cfg", f"unknown key(s) {sorted(unknown)}; valid keys: {sorted(ATTN_DEFAULTS)}")
        if self.attn_layer_idx:
            a = self.attn
            need(isinstance(a["num_heads"], int) and a["num_heads"] > 0, "attn_cfg.num_heads",
                 "must be a positive integer when attn_layer_idx is not empty")
            need(isinstance(a["num_heads_kv"], int) and a["num_heads_kv"] > 0, "attn_cfg.num_heads_kv",
                 "must be a positive integer")
            need(a["num_heads"] % a["num_heads_kv"] == 0, "attn_cfg.num_heads",
                 f"num_heads = {a['num_heads']} is not divisible by num_heads_kv = {a['num_heads_kv']}")
            need(a["head_dim"] > 0, "attn_cfg.head_dim",
                 f"must be positive (d_model = {self.d_model}, num_heads = {a['num_heads']})")
            need(0 <= a["rotary_emb_dim"] <= a["head_dim"] and a["rotary_emb_dim"] % 2 == 0, "attn_cfg.rotary_emb_dim",
                 f"must be even and no larger than head_dim = {a['head_dim']}, got {a['rotary_emb_dim']}")
            need(a["d_conv"] >= 0, "attn_cfg.d_conv", "must be non-negative")
            need(a["mlp_dim"] >= 0, "attn_cfg.mlp_dim", "must be non-negative")
            need(a["causal"] is True, "attn_cfg.causal", "a language model's attention must be causal")
            need(not a["rotary_emb_interleaved"], "attn_cfg.rotary_emb_interleaved", "interleaved rotary is not supported")
        need(self.rms_norm is True, "rms_norm", "only RMSNorm is supported (as in every published Mamba-2 checkpoint)")

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["ssm_cfg"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.ssm_cfg.items()}
        if "layer" not in d["ssm_cfg"]:
            d["ssm_cfg"] = {"layer": "Mamba2", **d["ssm_cfg"]}
        for k, v in d["ssm_cfg"].items():  # JSON has no infinity
            if isinstance(v, list):
                d["ssm_cfg"][k] = [x if math.isfinite(x) else 1e30 for x in v]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Mamba2Config":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - _IGNORED_KEYS
        if unknown:
            raise ConfigError(f"Mamba2Config: unknown field(s) {sorted(unknown)}; valid fields: {sorted(known)}")
        ssm_cfg = dict(d.get("ssm_cfg") or {})
        if "dt_limit" in ssm_cfg:  # written as 1e30 for infinity
            ssm_cfg["dt_limit"] = tuple(math.inf if v >= 1e30 else v for v in ssm_cfg["dt_limit"])
        d["ssm_cfg"] = ssm_cfg
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mamba2Config":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no model config at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Mamba2Config":
        """A preset, with fields overridden; ssm_cfg and attn_cfg overrides merge into the preset's."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        d = copy.deepcopy(PRESETS[name])
        for key in ("ssm_cfg", "attn_cfg"):  # merged key by key, as in recipes: the preset's other keys stay
            if isinstance(overrides.get(key), dict):
                overrides[key] = {**d.get(key, {}), **overrides[key]}
        d.update(overrides)
        return cls(**d)


def _published(d_model: int, n_layer: int, **extra) -> dict:
    return dict(d_model=d_model, n_layer=n_layer, d_intermediate=0, vocab_size=50277, ssm_cfg={"layer": "Mamba2"},
                rms_norm=True, residual_in_fp32=True, pad_vocab_size_multiple=16, tie_embeddings=True, **extra)


PRESETS: dict[str, dict] = {
    # the published state-spaces checkpoints
    "mamba2-130m": _published(768, 24),
    "mamba2-370m": _published(1024, 48),
    "mamba2-780m": _published(1536, 48),
    "mamba2-1.3b": _published(2048, 48),
    "mamba2-2.7b": _published(2560, 64),
    "mamba2attn-2.7b": _published(
        2560, 64, attn_layer_idx=[9, 18, 27, 36, 45, 56],
        attn_cfg={"causal": True, "d_conv": 4, "head_dim": 128, "num_heads": 30, "out_proj_bias": False,
                  "qkv_proj_bias": False, "rotary_emb_dim": 64}),
    # small models: the CPU default, tests, synthetic tasks. Vocabulary 256 = the built-in byte tokenizer's size.
    "mamba2-tiny": dict(d_model=256, n_layer=4, vocab_size=256, pad_vocab_size_multiple=16,
                        ssm_cfg={"d_state": 32, "headdim": 32, "chunk_size": 64}),
    "mamba2attn-tiny": dict(d_model=256, n_layer=4, vocab_size=256, pad_vocab_size_multiple=16, attn_layer_idx=[2],
                            ssm_cfg={"d_state": 32, "headdim": 32, "chunk_size": 64},
                            attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 32, "d_conv": 4,
                                      "qkv_proj_bias": False, "out_proj_bias": False}),
    "mamba2-test": dict(d_model=64, n_layer=2, vocab_size=256, pad_vocab_size_multiple=16,
                        ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}),
    "mamba2attn-test": dict(d_model=64, n_layer=3, vocab_size=256, pad_vocab_size_multiple=16, attn_layer_idx=[1],
                            d_intermediate=96, ssm_cfg={"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16},
                            attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8, "d_conv": 4}),
}
