"""Model configuration: mamba_ssm's config.json field names, Mamba-2 defaults, presets and validation.

Inside, every setting is typed: `Mamba2Config.ssm_cfg` is an `SSMConfig` and `attn_cfg` an `AttentionConfig`, both
holding every field with mamba_ssm's defaults; `config.ssm` / `config.attn` are the same with the derived values
resolved (d_ssm, num_heads_kv, head_dim). mamba_ssm's dict layout (`ssm_cfg` / `attn_cfg` as the keys that differ
from its defaults) is only the file format: `to_dict` / `from_dict`, `save` / `load`. A dict given for `ssm_cfg` or
`attn_cfg` at construction sets the keys it names over the defaults (over the preset's values in `from_name` and
`merged`): that merge is written once, `_Section.merged`.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

# Keys of mamba_ssm's config.json that we accept but that change nothing here.
_IGNORED_KEYS = {"fused_add_norm"}


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model; the message names the field."""


def _unknown_key_error(where: str, key: str, valid: list[str], what: str = "key") -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown {what} {key!r}{hint}; valid {what}s: {', '.join(valid)}")


class _Section:
    """What SSMConfig and AttentionConfig share: built from a dict over a base (the one preset merge), and written
    back as mamba_ssm writes them (the keys that differ from the defaults)."""

    _name: str  # the Mamba2Config field holding it, for messages

    @classmethod
    def merged(cls, base, value):
        """`value` over `base`: a dict sets the keys it names (an unknown key is an error naming it and the closest
        valid one), a complete config replaces `base`, None keeps it."""
        if value is None:
            return base
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"Mamba2Config.{cls._name}: must be a dict (the keys it names over the defaults) or "
                              f"{cls.__name__}, got {value!r}")
        valid = [f.name for f in fields(cls)]
        for key in value:
            if key not in valid:
                raise _unknown_key_error(f"Mamba2Config.{cls._name}", key, valid)
        return replace(base, **value)

    def changed(self) -> dict[str, Any]:
        """The fields whose values differ from the defaults, in field order (mamba_ssm's `ssm_cfg` / `attn_cfg`)."""
        default = type(self)()
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) != getattr(default, f.name)}

    def _as_pairs(self, *names: str) -> None:  # JSON and YAML give lists
        for name in names:
            v = getattr(self, name)
            if isinstance(v, (list, tuple)) and all(_number(x) for x in v):
                object.__setattr__(self, name, tuple(float(x) for x in v))


@dataclass(frozen=True)
class SSMConfig(_Section):
    """The Mamba-2 mixer's settings, with mamba_ssm's defaults (mamba_ssm.modules.mamba2.Mamba2)."""

    layer: str = "Mamba2"
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    d_ssm: Optional[int] = None  # None: the whole d_inner goes through the SSM
    ngroups: int = 1
    A_init_range: tuple[float, float] = (1.0, 16.0)
    D_has_hdim: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    bias: bool = False
    conv_bias: bool = True
    conv_init: Optional[float] = None
    chunk_size: int = 256

    _name = "ssm_cfg"

    def __post_init__(self):
        self._as_pairs("A_init_range", "dt_limit")


@dataclass(frozen=True)
class AttentionConfig(_Section):
    """The attention mixer's settings, with the defaults of mamba_ssm's MHA as its create_block builds it, except
    `causal` (a language model's attention is causal; mamba_ssm's MHA defaults to False, so config.json always
    says it)."""

    num_heads: Optional[int] = None  # required when Mamba2Config.attn_layer_idx is not empty
    num_heads_kv: Optional[int] = None  # None: as many as num_heads (plain multi-head attention)
    head_dim: Optional[int] = None  # None: d_model // num_heads
    mlp_dim: int = 0
    qkv_proj_bias: bool = True
    out_proj_bias: bool = True
    softmax_scale: Optional[float] = None  # None: 1/sqrt(head_dim)
    causal: bool = True
    d_conv: int = 0
    rotary_emb_dim: int = 0
    rotary_emb_base: float = 10000.0
    rotary_emb_interleaved: bool = False

    _name = "attn_cfg"


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Mamba2Config:
    """A Mamba-2 or hybrid Mamba-2/attention language model, as mamba_ssm's `MambaConfig` spells it.

    `ssm_cfg` and `attn_cfg` may be given as dicts (mamba_ssm's layout: the keys given set those fields over the
    defaults); they are kept as `SSMConfig` / `AttentionConfig`.
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: SSMConfig = field(default_factory=SSMConfig)
    attn_layer_idx: list[int] = field(default_factory=list)
    attn_cfg: AttentionConfig = field(default_factory=AttentionConfig)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True  # accepted for compatibility; the plain PyTorch path has nothing to fuse
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self):
        self.ssm_cfg = SSMConfig.merged(SSMConfig(), self.ssm_cfg)
        self.attn_cfg = AttentionConfig.merged(AttentionConfig(), self.attn_cfg)
        try:
            self.attn_layer_idx = sorted(int(i) for i in (self.attn_layer_idx or []))
        except (TypeError, ValueError):
            raise ConfigError(f"Mamba2Config.attn_layer_idx: must be a list of layer indices, got "
                              f"{self.attn_layer_idx!r}") from None
        self.validate()

    def merged(self, **overrides) -> "Mamba2Config":
        """This config with fields overridden: a dict for `ssm_cfg` / `attn_cfg` sets only the keys it names (the
        others keep this config's values); any other value replaces the field's."""
        valid = [f.name for f in fields(self)]
        for key in overrides:
            if key not in valid:
                raise _unknown_key_error("Mamba2Config", key, valid, "field")
        for key, section in (("ssm_cfg", SSMConfig), ("attn_cfg", AttentionConfig)):
            if key in overrides:
                overrides[key] = section.merged(getattr(self, key), overrides[key])
        return replace(self, **overrides)

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def ssm(self) -> SSMConfig:
        """The Mamba-2 mixer's settings (ssm_cfg) with d_ssm resolved."""
        if self.ssm_cfg.d_ssm is not None:
            return self.ssm_cfg
        return replace(self.ssm_cfg, d_ssm=self.d_inner)

    @property
    def attn(self) -> AttentionConfig:
        """The attention mixer's settings (attn_cfg) with num_heads_kv and head_dim resolved (once num_heads is
        set)."""
        a = self.attn_cfg
        if not _positive_int(a.num_heads) or (a.num_heads_kv is not None and a.head_dim is not None):
            return a
        return replace(a, num_heads_kv=a.num_heads if a.num_heads_kv is None else a.num_heads_kv,
                       head_dim=self.d_model // a.num_heads if a.head_dim is None else a.head_dim)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size if m <= 1 else math.ceil(self.vocab_size / m) * m

    @property
    def d_inner(self) -> int:
        return self.ssm_cfg.expand * self.d_model

    @property
    def d_ssm(self) -> int:
        return self.ssm.d_ssm

    @property
    def nheads(self) -> int:
        return self.d_ssm // self.ssm_cfg.headdim

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ConfigError(f"Mamba2Config.{name}: {msg}")

        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            need(_positive_int(value), name, f"must be a positive integer, got {value!r}")
        need(isinstance(self.d_intermediate, int) and self.d_intermediate >= 0, "d_intermediate",
             f"must be a non-negative integer, got {self.d_intermediate!r}")

        c = self.ssm_cfg  # its own fields first: the resolved values below compute with them
        need(c.layer == "Mamba2", "ssm_cfg.layer",
             f"must be 'Mamba2' (this package builds Mamba-2 models only), got {c.layer!r}")
        for key in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            need(_positive_int(getattr(c, key)), f"ssm_cfg.{key}", f"must be a positive integer, got "
                 f"{getattr(c, key)!r}")
        need(c.d_conv >= 2, "ssm_cfg.d_conv", f"must be at least 2, got {c.d_conv}")
        if c.d_ssm is not None:
            need(_positive_int(c.d_ssm) and c.d_ssm <= self.d_inner, "ssm_cfg.d_ssm",
                 f"must be a positive integer no larger than expand * d_model = {self.d_inner}, got {c.d_ssm!r}")
        for key in ("A_init_range", "dt_limit"):
            v = getattr(c, key)
            need(isinstance(v, tuple) and len(v) == 2, f"ssm_cfg.{key}", f"must be a pair of numbers, got {v!r}")
        for key in ("dt_min", "dt_max", "dt_init_floor"):
            need(_number(getattr(c, key)), f"ssm_cfg.{key}", f"must be a number, got {getattr(c, key)!r}")
        s = self.ssm
        need(s.d_ssm % s.headdim == 0, "ssm_cfg.headdim",
             f"d_ssm = {s.d_ssm} is not divisible by headdim = {s.headdim}")
        need(self.nheads % s.ngroups == 0, "ssm_cfg.ngroups",
             f"nheads = {self.nheads} (d_ssm / headdim) is not divisible by ngroups = {s.ngroups}")
        need(s.d_ssm % s.ngroups == 0, "ssm_cfg.ngroups", f"d_ssm = {s.d_ssm} is not divisible by ngroups")
        lo, hi = s.A_init_range
        need(0 < lo <= hi, "ssm_cfg.A_init_range", f"must satisfy 0 < low <= high, got {s.A_init_range}")
        need(0 < s.dt_min <= s.dt_max, "ssm_cfg.dt_min", f"must satisfy 0 < dt_min <= dt_max, got "
             f"({s.dt_min}, {s.dt_max})")
        lo, hi = s.dt_limit
        need(0 <= lo < hi, "ssm_cfg.dt_limit", f"must satisfy 0 <= low < high, got {s.dt_limit}")

        need(all(0 <= i < self.n_layer for i in self.attn_layer_idx), "attn_layer_idx",
             f"indices must lie in [0, n_layer={self.n_layer}), got {self.attn_layer_idx}")
        need(len(set(self.attn_layer_idx)) == len(self.attn_layer_idx), "attn_layer_idx", "has repeated indices")
        if self.attn_layer_idx:
            a = self.attn
            need(_positive_int(a.num_heads), "attn_cfg.num_heads",
                 "must be a positive integer when attn_layer_idx is not empty")
            need(_positive_int(a.num_heads_kv), "attn_cfg.num_heads_kv", "must be a positive integer")
            need(a.num_heads % a.num_heads_kv == 0, "attn_cfg.num_heads",
                 f"num_heads = {a.num_heads} is not divisible by num_heads_kv = {a.num_heads_kv}")
            need(_positive_int(a.head_dim), "attn_cfg.head_dim", f"must be a positive integer (d_model = "
                 f"{self.d_model}, num_heads = {a.num_heads}), got {a.head_dim!r}")
            need(isinstance(a.rotary_emb_dim, int) and 0 <= a.rotary_emb_dim <= a.head_dim
                 and a.rotary_emb_dim % 2 == 0, "attn_cfg.rotary_emb_dim",
                 f"must be even and no larger than head_dim = {a.head_dim}, got {a.rotary_emb_dim!r}")
            need(isinstance(a.d_conv, int) and a.d_conv >= 0, "attn_cfg.d_conv", "must be a non-negative integer")
            need(isinstance(a.mlp_dim, int) and a.mlp_dim >= 0, "attn_cfg.mlp_dim", "must be a non-negative integer")
            need(a.causal is True, "attn_cfg.causal", "a language model's attention must be causal")
            need(not a.rotary_emb_interleaved, "attn_cfg.rotary_emb_interleaved", "interleaved rotary is not supported")
        need(self.rms_norm is True, "rms_norm", "only RMSNorm is supported (as in every published Mamba-2 checkpoint)")

    # ---- (de)serialisation: mamba_ssm's config.json layout --------------------------------------------------
    def to_dict(self, inf: float = 1e30) -> dict:
        """The config.json that mamba_ssm writes (plus norm_epsilon and initializer_range): every field, with
        `ssm_cfg` / `attn_cfg` holding the values that differ from the defaults. `ssm_cfg` always names its layer (no
        layer is Mamba-1 to mamba_ssm) and a hybrid's `attn_cfg` always says causal (mamba_ssm's MHA is non-causal
        unless told). Pairs are lists, with infinity written as `inf` (JSON has none; from_dict reads 1e30 back)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        ssm_cfg = {"layer": self.ssm_cfg.layer, **self.ssm_cfg.changed()}
        d["ssm_cfg"] = {k: [x if math.isfinite(x) else inf for x in v] if isinstance(v, tuple) else v
                        for k, v in ssm_cfg.items()}
        d["attn_cfg"] = self.attn_cfg.changed()
        if self.attn_layer_idx:
            d["attn_cfg"]["causal"] = self.attn_cfg.causal
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Mamba2Config":
        d = dict(d)
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known and key not in _IGNORED_KEYS:
                raise _unknown_key_error("Mamba2Config", key, known, "field")
        ssm_cfg = d.get("ssm_cfg")
        if isinstance(ssm_cfg, Mapping) and isinstance(ssm_cfg.get("dt_limit"), (list, tuple)):
            ssm_cfg = dict(ssm_cfg)  # written as 1e30 for infinity
            ssm_cfg["dt_limit"] = [math.inf if _number(v) and v >= 1e30 else v for v in ssm_cfg["dt_limit"]]
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
        """A preset, with fields overridden (`merged`: ssm_cfg and attn_cfg dicts merge into the preset's)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[name]).merged(**overrides)


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
