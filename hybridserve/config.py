"""The two frozen configurations: what the model is (`ModelConfig`) and how we serve it (`EngineConfig`).

`ModelConfig.from_hf` reads a NemotronH `config.json` from a checkpoint directory, or a preset
shipped in `hybridserve/presets/<name>/`. Values measured at start-up (KV blocks, state slots) are
never written back here: the model runner returns them.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from hybridserve.config_flags import token_count

PRESETS_DIR = Path(__file__).parent / "presets"
LAYER_TYPES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
# auto: the checkpoint's weights (random for presets); dummy: random weights with realistic spread
# (tokens route to many experts); dummy-uniform: every tensor uniform in +-1e-3 as vLLM's dummy
# loader does, which routes every token to the same experts: only for comparing with vLLM's
# dummy-weight benchmarks.
LOAD_FORMATS = ("auto", "dummy", "dummy-uniform")
# fp8: quantize the projections of a BF16 (or dummy) model to FP8 at load; modelopt: the checkpoint
# must be ModelOpt FP8. A ModelOpt FP8 checkpoint is served in FP8 without the flag too.
QUANTIZATIONS = ("fp8", "modelopt")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # fp8 = fp8_e4m3: float8_e4m3fn pages, per-layer k/v scales
# `layers_block_type` entries; transformers >= 5 writes linear_attention / full_attention.
_BLOCK_TYPE_TO_CHAR = {
    "mamba": "M",
    "linear_attention": "M",
    "attention": "*",
    "full_attention": "*",
    "moe": "E",
    "mlp": "-",
}

# Old (remote-code era) spellings -> the names we use.
_KEY_ALIASES = {
    "mamba_n_heads": "mamba_num_heads",
    "mamba_d_head": "mamba_head_dim",
    "mamba_d_state": "ssm_state_size",
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "rms_norm_eps": "layer_norm_epsilon",
}


class ConfigError(ValueError):
    """A config.json (or preset) that cannot describe a NemotronH model; the message says why."""


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    layer_types: str  # one char per layer: M mamba, * attention, E moe, - dense mlp
    vocab_size: int
    hidden_size: int
    # attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # mamba-2
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    # moe / mlp
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    n_shared_experts: int = 1
    intermediate_size: int = 0
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    # misc
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    max_position_embeddings: int = 262144
    torch_dtype: str = "bfloat16"
    mamba_ssm_cache_dtype: str = "float32"
    quantization: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    # where it came from: a checkpoint directory or a preset directory
    path: str | None = None
    preset: str | None = None

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_dim(self) -> int:
        return self.d_inner + self.conv_dim + self.mamba_num_heads

    def layers_of(self, char: str) -> list[int]:
        """Indices of the layers of one type ('M', '*', 'E' or '-')."""
        return [i for i, c in enumerate(self.layer_types) if c == char]

    @property
    def has_weights(self) -> bool:
        """A checkpoint directory with safetensors files (presets have none)."""
        return self.path is not None and any(Path(self.path).glob("*.safetensors"))

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_preset: str | os.PathLike) -> ModelConfig:
        """Read `config.json` from a checkpoint directory, or load a preset by name."""
        p = Path(path_or_preset)
        preset = None
        if not p.exists() and (PRESETS_DIR / str(path_or_preset)).is_dir():
            preset = str(path_or_preset)
            p = PRESETS_DIR / preset
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            names = ", ".join(sorted(c.parent.name for c in PRESETS_DIR.glob("*/config.json")))
            raise ConfigError(f"{path_or_preset!s}: no config.json there and no preset of that name (presets: {names})")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
        return cls.from_dict(raw, path=str(p.parent), preset=preset)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str | None = None, preset: str | None = None) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, not {type(raw).__name__}")
        d = dict(raw)
        for old, new in _KEY_ALIASES.items():
            if old in d and new not in d:
                d[new] = d.pop(old)
        model_type = d.get("model_type")
        if model_type not in (None, "nemotron_h"):
            raise ConfigError(f"model_type is {model_type!r}; hybridserve serves NemotronH ('nemotron_h') only")
        d["layer_types"] = _layer_pattern(d)
        if "n_routed_experts" not in d and "num_experts" in d:
            d["n_routed_experts"] = d["num_experts"]
        eos = 2 if d.get("eos_token_id") is None else d["eos_token_id"]
        d["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (int(eos),)
        heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
        if d.get("head_dim") is None and isinstance(heads, int) and heads > 0 and isinstance(hidden, int):
            d["head_dim"] = hidden // heads
        d["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype") or "bfloat16").replace("torch.", "")
        d["mamba_ssm_cache_dtype"] = str(d.get("mamba_ssm_cache_dtype") or "float32").replace("torch.", "")
        d["quantization"] = d.get("quantization_config")
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"config is missing required keys: {', '.join(missing)}")
        cfg = cls(**{k: v for k, v in d.items() if k in known and k not in ("path", "preset")}, path=path, preset=preset)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in fields(self):
            if f.type == "int" and not f.name.endswith("_token_id"):  # token ids may be null
                value = getattr(self, f.name)
                _need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                     f"{f.name} must be a non-negative integer, not {value!r}")
        _need(self.num_layers > 0, "the layer pattern is empty")
        _need(set(self.layer_types) <= set(LAYER_TYPES), f"unknown layer type in pattern {self.layer_types!r}")
        _need(self.vocab_size > 0 and self.hidden_size > 0, "vocab_size and hidden_size must be positive")
        if "*" in self.layer_types:
            _need(min(self.num_attention_heads, self.num_key_value_heads, self.head_dim) > 0,
                 "num_attention_heads, num_key_value_heads and head_dim must be positive")
            _need(
                self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})",
            )
        if "M" in self.layer_types:
            _need(min(self.mamba_num_heads, self.mamba_head_dim, self.ssm_state_size, self.n_groups) > 0,
                 "mamba_num_heads, mamba_head_dim, ssm_state_size and n_groups must be positive")
            _need(
                self.mamba_num_heads % self.n_groups == 0,
                f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})",
            )
            _need(self.conv_kernel >= 2, "conv_kernel must be >= 2")
        if "E" in self.layer_types:
            _need(
                0 < self.num_experts_per_tok <= self.n_routed_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, n_routed_experts={self.n_routed_experts}]",
            )
            _need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
        if "-" in self.layer_types:
            _need(self.intermediate_size > 0, "intermediate_size must be positive for '-' (dense MLP) layers")
        _need(
            self.torch_dtype in ("float32", "bfloat16", "float16"),
            f"torch_dtype {self.torch_dtype!r} must be float32, bfloat16 or float16",
        )
        _need(
            self.mamba_ssm_cache_dtype in ("float32", "bfloat16", "float16"),
            f"mamba_ssm_cache_dtype {self.mamba_ssm_cache_dtype!r} must be float32, bfloat16 or float16",
        )


def _layer_pattern(d: dict[str, Any]) -> str:
    """The per-layer type string, from `hybrid_override_pattern` or `layers_block_type`."""
    pattern = d.get("hybrid_override_pattern")
    block_types = d.get("layers_block_type")
    if pattern is None and block_types is not None:
        if not isinstance(block_types, list):
            raise ConfigError(f"layers_block_type must be a list of layer types, not {block_types!r}")
        try:
            pattern = "".join(_BLOCK_TYPE_TO_CHAR[t] for t in block_types)
        except KeyError as e:
            raise ConfigError(f"layers_block_type has unknown entry {e.args[0]!r}") from None
    if pattern is None:
        raise ConfigError("config has neither hybrid_override_pattern nor layers_block_type")
    if not isinstance(pattern, str):
        raise ConfigError(f"hybrid_override_pattern must be a string such as 'M*E-', not {pattern!r}")
    bad = set(pattern) - set(LAYER_TYPES)
    if bad:
        raise ConfigError(f"hybrid_override_pattern has unknown layer types {sorted(bad)} (known: M * E -)")
    n = d.get("num_hidden_layers")
    if n is not None and n != len(pattern):
        raise ConfigError(f"num_hidden_layers is {n} but the layer pattern has {len(pattern)} entries")
    return pattern


DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu")
MAMBA_SSM_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """How to serve: sizes, dtypes, devices. Built by the CLI (one flag per field, see
    `config_flags.py`: a field's trailing comment or `help` metadata is its flag's help) or `LLM(...)`."""

    model: str = field(default="tiny", metadata={"flag": False})  # checkpoint directory or preset name
    tokenizer: str | None = None  # tokenizer directory, hub id or preset (default: the model's)
    served_model_name: str | None = field(default=None, metadata={"flag": False})
    load_format: str = field(default="auto", metadata={"choices": LOAD_FORMATS, "help": (
        "auto: the checkpoint's weights; dummy: random weights that route over many experts; "
        "dummy-uniform: vLLM's uniform dummy init (every token to the same experts)")})
    dtype: str = field(default="auto", metadata={"choices": DTYPES, "help": "weights and activations (auto: the checkpoint's)"})
    device: str = field(default="auto", metadata={"choices": DEVICES, "help": "auto: cuda if available"})
    seed: int = 0  # seed of random (dummy) weights
    max_model_len: int | None = field(default=None, metadata={"parse": token_count, "help": (
        "context limit in tokens, e.g. 8192 or 32k (default: the model's limit, at most 8192)")})
    max_num_seqs: int = 256  # max concurrent running sequences
    max_num_batched_tokens: int = 8192  # token budget per engine step (long prompts are prefilled in chunks)
    max_prefill_tokens_while_decoding: int = field(default=1024, metadata={"help": (
        "prompt tokens per step while sequences decode (a decode step carrying a long prefill chunk "
        "stretches every stream's inter-token latency); without decodes prompts get the whole "
        "--max-num-batched-tokens")})
    block_size: int = 16  # tokens per KV-cache block
    gpu_memory_utilization: float = 0.90  # fraction of GPU memory for weights, activations and caches
    cpu_cache_bytes: int = 512 * 1024 * 1024  # cache budget (KV + Mamba state) on CPU
    num_kv_blocks: int | None = None  # fix the KV block count instead of sizing it from memory
    kv_cache_dtype: str = field(default="auto", metadata={"choices": KV_CACHE_DTYPES, "help": (
        "auto: the model dtype; fp8 = fp8_e4m3: float8_e4m3fn KV pages (half the bytes, twice the tokens) with "
        "per-layer k/v scales (the checkpoint's k_scale / v_scale, else 1.0)")})
    mamba_ssm_cache_dtype: str = field(default="auto", metadata={"choices": MAMBA_SSM_CACHE_DTYPES, "help": (
        "Mamba SSM state dtype (auto: the config's, float32 for Nemotron-3-Nano)")})
    mamba_cache_stochastic_rounding: bool = field(default=True, metadata={
        "aliases": ("--enable-mamba-cache-stochastic-rounding",), "help": (
            "round a 16-bit SSM state stochastically on every write (keeps long generations close to the "
            "float32 state, bench/state_rounding.py measures it); off: to nearest. No effect on float32")})
    enforce_eager: bool = False  # no CUDA graphs
    max_cudagraph_capture_size: int | None = field(default=None, metadata={"help": (
        "largest decode batch run as a CUDA graph, bigger ones run eager (default: max_num_seqs, "
        "capped at the state slots that fit)")})
    max_prefill_graph_tokens: int = field(default=2048, metadata={"help": (
        "largest prefill or mixed step (tokens) run as a CUDA graph; such a step has at most 32 sequences, or up "
        "to the largest decode batch beside at most --max-prefill-tokens-while-decoding prompt tokens, and no "
        "prefix-cache snapshot inside, else it runs eager (such steps are launch-bound eager: a graph costs a "
        "fraction of the host time). 0: none")})
    async_scheduling: bool = field(default=True, metadata={"help": (
        "overlap the host and the GPU: schedule and launch step N+1 before waiting for step N's tokens "
        "(the same outputs; --no-async-scheduling: every step waits for the previous step's tokens)")})
    enable_prefix_caching: bool = field(default=True, metadata={"help": (
        "reuse cached KV blocks and Mamba state snapshots of earlier prompts and answers (a hit resumes "
        "at the deepest snapshot whose tokens prefix the new prompt)")})
    prefix_cache_snapshots: int = field(default=32, metadata={"help": (
        "Mamba state snapshots the prefix cache keeps (each costs one state slot of memory, about 47 MiB "
        "for Nemotron-3-Nano with a float32 SSM state)")})
    tensor_parallel_size: int = field(default=1, metadata={"aliases": ("-tp",), "help": "GPUs per model; only 1 for now"})
    quantization: str | None = field(default=None, metadata={"choices": QUANTIZATIONS, "help": (
        "fp8: quantize the BF16 projections (Mamba, MLP, experts) to FP8 at load, per-channel weight and "
        "per-token activation scales; modelopt: require a ModelOpt FP8 checkpoint. A ModelOpt FP8 checkpoint "
        "is served in FP8 without this flag (and unchanged with it). Default: the checkpoint's own formats")})

    def __post_init__(self) -> None:
        _need(self.load_format in LOAD_FORMATS, f"load_format must be one of {LOAD_FORMATS}, not {self.load_format!r}")
        _need(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}")
        _need(self.device in DEVICES, f"unknown device {self.device!r}")
        _need(self.kv_cache_dtype in KV_CACHE_DTYPES,
              f"unknown kv_cache_dtype {self.kv_cache_dtype!r} (supported: {', '.join(KV_CACHE_DTYPES)})")
        _need(self.quantization in (None, *QUANTIZATIONS),
              f"quantization {self.quantization!r} is not supported (supported: fp8, which quantizes a BF16 or "
              "dummy model at load, and modelopt, for ModelOpt FP8 checkpoints)")
        _need(self.mamba_ssm_cache_dtype in MAMBA_SSM_CACHE_DTYPES,
              f"unknown mamba_ssm_cache_dtype {self.mamba_ssm_cache_dtype!r}")
        _need(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _need(self.max_prefill_tokens_while_decoding >= 1, "max_prefill_tokens_while_decoding must be >= 1")
        _need(self.max_cudagraph_capture_size is None or self.max_cudagraph_capture_size >= 1,
              "max_cudagraph_capture_size must be >= 1")
        _need(self.max_prefill_graph_tokens >= 0, "max_prefill_graph_tokens must be >= 0")
        _need(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization must be in (0, 1]")
        _need(self.block_size >= 1, "block_size must be >= 1")
        _need(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1")
        _need(self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1")
        _need(self.prefix_cache_snapshots >= 1, "prefix_cache_snapshots must be >= 1 (turn caching off with "
              "enable_prefix_caching=False)")
        _need(self.tensor_parallel_size == 1, "tensor_parallel_size > 1 is not supported yet")
