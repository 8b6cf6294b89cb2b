"""A model folder's config read as transformers reads it: the fields 4.x writes and those 5.x writes (rope_parameters),
the real Phi-3-medium config, and what the engine does not implement refused."""

import json

import pytest

from orinfer.config import ModelConfig
from orinfer.tiny import ASSETS, tiny_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"rope_scaling": {"type": "longrope", "long_factor": [1.0]}},
            "scaled RoPE \\('longrope'\\)",
        ),
        (
            {
                "rope_scaling": None,
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0],
                },
            },
            "scaled RoPE \\('longrope'\\)",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "partial_rotary_factor": 0.5,
                }
            },
            "partial",
        ),
        (
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
            "Phi3ForCausalLM \\(phi3\\), LlamaForCausalLM",
        ),
        ({"head_dim": 32}, "head_dim=32"),
    ],
)
def test_unsupported_configs_fail_fast(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**tiny_config(), **change})


def test_rope_theta_is_read_where_either_transformers_writes_it():
    """4.x writes rope_theta at the top level; 5.x only inside rope_parameters (a Phi-3 config re-saved by 5.x was
    once read with the default 10000, and the converted SmolLM2's text then differed from the pipeline's)."""
    v4 = {**tiny_config(), "rope_theta": 100000.0, "rope_scaling": None}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 100000.0,
        "partial_rotary_factor": 1.0,
    }
    assert ModelConfig.from_dict(v4).rope_theta == ModelConfig.from_dict(v5).rope_theta == 100000.0


def test_a_config_saved_by_the_installed_transformers_is_read_alike(tmp_path):
    from transformers import Phi3Config as HFConfig

    HFConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=54321.0,
        vocab_size=32064,
        max_position_embeddings=96,
    ).save_pretrained(tmp_path)
    cfg = ModelConfig.from_folder(tmp_path)
    assert (cfg.rope_theta, cfg.head_dim, cfg.num_key_value_heads, cfg.max_position_embeddings) == (
        54321.0,
        16,
        2,
        96,
    )


def test_real_phi3_medium_config_is_read():
    cfg = ModelConfig.from_folder(ASSETS)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (
        5120,
        40,
        10,
        128,
    )
    assert cfg.kv_bytes_per_token == 200 * 1024 and cfg.sliding_window == 2047
    assert cfg.num_parameters == 13_960_238_080  # 26.0 GiB in bf16
    assert json.loads((ASSETS / "generation_config.json").read_text())["eos_token_id"] == [
        32000,
        32001,
        32007,
    ]
