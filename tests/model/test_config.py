"""ModelConfig: both layer-pattern forms, old key spellings, presets, and clear errors."""

from __future__ import annotations

import json

import pytest
from model_helpers import tiny_config

from hybridserve.config import ConfigError, ModelConfig


def _without(raw: dict, *keys) -> dict:
    return {k: v for k, v in raw.items() if k not in keys}


def test_pattern_string_and_block_type_list_agree():
    from_pattern = ModelConfig.from_dict(tiny_config("ME*EM-*E"))
    lists = {
        "legacy": ["mamba", "moe", "attention", "moe", "mamba", "mlp", "attention", "moe"],
        "transformers 5": ["linear_attention", "moe", "full_attention", "moe", "linear_attention", "mlp",
                           "full_attention", "moe"],
    }
    for block_types in lists.values():
        raw = _without(tiny_config("ME*EM-*E"), "hybrid_override_pattern")
        cfg = ModelConfig.from_dict({**raw, "layers_block_type": block_types})
        assert cfg == from_pattern
    assert from_pattern.layer_types == "ME*EM-*E"
    assert from_pattern.layers_of("M") == [0, 4] and from_pattern.layers_of("*") == [2, 6]


def test_old_mamba_key_spellings():
    raw = tiny_config("M*E")
    old = {"mamba_num_heads": "mamba_n_heads", "mamba_head_dim": "mamba_d_head", "ssm_state_size": "mamba_d_state",
           "n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "chunk_size": "mamba_chunk_size",
           "layer_norm_epsilon": "rms_norm_eps"}
    renamed = {old.get(k, k): v for k, v in raw.items()}
    assert ModelConfig.from_dict(renamed) == ModelConfig.from_dict(raw)


def test_derived_sizes_of_the_full_size_preset():
    cfg = ModelConfig.from_hf("nemotron-3-nano-30b-a3b")
    assert (cfg.num_layers, cfg.d_inner, cfg.conv_dim, cfg.in_proj_dim) == (52, 4096, 6144, 10304)
    assert cfg.layers_of("*") == [5, 12, 19, 26, 33, 42] and len(cfg.layers_of("E")) == 23
    assert cfg.preset == "nemotron-3-nano-30b-a3b" and not cfg.has_weights


def test_config_of_a_transformers_checkpoint_directory(tmp_path):
    """transformers writes layers_block_type, dtype (not torch_dtype) and no num_hidden_layers."""
    raw = _without(tiny_config("M*E-"), "hybrid_override_pattern", "num_hidden_layers", "torch_dtype")
    raw.update(layers_block_type=["linear_attention", "full_attention", "moe", "mlp"], dtype="bfloat16",
               eos_token_id=[2, 11], time_step_limit=[0.0, {"__float__": "Infinity"}])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.layer_types == "M*E-" and cfg.torch_dtype == "bfloat16" and cfg.eos_token_id == (2, 11)
    assert cfg.path == str(tmp_path) and cfg.preset is None


BAD = [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"hybrid_override_pattern": "MX*"}, "unknown layer types \\['X'\\]"),
    ({"hybrid_override_pattern": "M*E", "num_hidden_layers": 4}, "num_hidden_layers is 4 but the layer pattern has 3"),
    ({"hybrid_override_pattern": ["M", "*"]}, "hybrid_override_pattern must be a string"),
    ({"hybrid_override_pattern": None, "layers_block_type": ["mamba", "conv"]}, "layers_block_type has unknown entry 'conv'"),
    ({"hybrid_override_pattern": None}, "neither hybrid_override_pattern nor layers_block_type"),
    ({"hidden_size": None}, "missing required keys: hidden_size"),
    ({"num_key_value_heads": 3}, "num_attention_heads \\(4\\) must be a multiple of num_key_value_heads \\(3\\)"),
    ({"num_key_value_heads": 0}, "must be positive"),
    ({"n_groups": 0}, "must be positive"),
    ({"n_groups": 3}, "mamba_num_heads \\(4\\) must be a multiple of n_groups \\(3\\)"),
    ({"hidden_size": "32"}, "hidden_size must be a non-negative integer, not '32'"),
    ({"num_experts_per_tok": 7}, "num_experts_per_tok \\(7\\) must be in \\[1, n_routed_experts=6\\]"),
    ({"intermediate_size": 0}, "intermediate_size must be positive"),
    ({"conv_kernel": 1}, "conv_kernel must be >= 2"),
    ({"torch_dtype": "int8"}, "torch_dtype 'int8'"),
    ({"mamba_ssm_cache_dtype": "float64"}, "mamba_ssm_cache_dtype 'float64'"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_configs_say_what_is_wrong(change, message):
    raw = {k: v for k, v in {**tiny_config("ME*EM-*E"), **change}.items() if v is not None}  # None: key removed
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no preset of that name \\(presets: nemotron-3-nano-30b-a3b, tiny\\)"):
        ModelConfig.from_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_hf(tmp_path)
