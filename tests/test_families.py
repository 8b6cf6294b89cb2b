"""Model families (orinfer/families.py): Llama-family folders run as they are, exactly as transformers' own class for
the folder runs them (float32, the pipeline as oracle); the name table; what is refused."""

import json

import pytest
import torch
from conftest import hf_pipeline, reference
from safetensors.torch import load_file, save_file

import optimize
from orinfer.config import ModelConfig
from orinfer.families import FAMILIES, weight_targets
from orinfer.tiny import write_tiny_model

CHATS = [
    [{"role": "user", "content": text}]
    for text in (
        "question: Which is a mammal?\nchoices: ['a shark', 'a whale', 'a trout', 'an eel']\n",
        "Tell me a story about a lighthouse.",
        "What is 2 + 2?",
    )
]


def as_family(folder, family: str, tied: bool = False, seed: int = 1):
    """The tiny Phi-3 folder's weights in `family`'s layout, in place: q/k/v and gate/up stored separately, the
    LM head the token table where `tied`, q/k/v biases (random) where the family has them."""
    cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    heads, kv, inter = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["intermediate_size"],
    )
    dim = cfg["hidden_size"] // heads
    g = torch.Generator().manual_seed(seed)
    for name in [
        n for n in weights if n.endswith("qkv_proj.weight") or n.endswith("gate_up_proj.weight")
    ]:
        fused = weights.pop(name)
        if "qkv" in name:
            for part, rows in zip("qkv", fused.split([heads * dim, kv * dim, kv * dim])):
                weights[name.replace("qkv_proj", f"{part}_proj")] = rows.contiguous()
                if family == "qwen2":
                    weights[name.replace("qkv_proj.weight", f"{part}_proj.bias")] = torch.randn(
                        len(rows), generator=g
                    )
        else:
            for part, rows in zip(("gate", "up"), fused.split([inter, inter])):
                weights[name.replace("gate_up_proj", f"{part}_proj")] = rows.contiguous()
    if tied:
        del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    arch = FAMILIES[family].architecture
    for key in ("sliding_window", "original_max_position_embeddings", "rope_scaling"):
        cfg.pop(key, None)
    cfg.update(
        model_type=family, architectures=[arch], tie_word_embeddings=tied, attention_bias=False
    )
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.mark.parametrize(
    "family, tied", [("llama", True), ("llama", False), ("mistral", False), ("qwen2", False)]
)
def test_a_family_folder_runs_as_transformers_runs_it(tmp_path, family, tied):
    """Each family's folder, as transformers' own class for it reads it, against the engine: the same text at fp32
    (the pipeline's), with drafting on and the engine's fused projections filled from separate ones."""
    folder = as_family(
        write_tiny_model(tmp_path / family, seed=0, std=0.1, end_boost=3.0), family, tied
    )
    cfg = ModelConfig.from_folder(folder)
    assert (cfg.family, cfg.tie_word_embeddings, cfg.attention_bias) == (
        family,
        tied,
        family == "qwen2",
    )
    hf = hf_pipeline(folder)
    assert type(hf.model).__name__ == FAMILIES[family].architecture
    expected = reference(hf, CHATS, max_new_tokens=24, return_full_text=False)
    gen = optimize.build(folder, device="cpu", progress=False, kv_tokens=4096)
    assert gen(CHATS, max_new_tokens=24, return_full_text=False) == expected


def test_the_name_table():
    split = {"self_attn.qkv_proj": [8, 2, 2], "mlp.gate_up_proj": [6, 6]}
    assert weight_targets("model.layers.3.self_attn.k_proj.weight", "llama", split, False) == [
        ("model.layers.3.self_attn.qkv_proj.weight", 8)
    ]
    assert weight_targets("model.layers.0.self_attn.v_proj.bias", "qwen2", split, False) == [
        ("model.layers.0.self_attn.qkv_proj.bias", 10)
    ]
    assert weight_targets("model.layers.1.mlp.up_proj.weight", "mistral", split, False) == [
        ("model.layers.1.mlp.gate_up_proj.weight", 6)
    ]
    assert weight_targets("model.embed_tokens.weight", "llama", split, True) == [
        ("model.embed_tokens.weight", 0),
        ("lm_head.weight", 0),
    ]
    assert weight_targets("model.layers.0.self_attn.qkv_proj.weight", "phi3", split, False) == [
        ("model.layers.0.self_attn.qkv_proj.weight", 0)
    ]


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
            "not supported; supported: Phi3ForCausalLM",
        ),
        ({"model_type": "llama", "architectures": ["MistralForCausalLM"]}, "not supported"),
        (
            {
                "model_type": "mistral",
                "architectures": ["MistralForCausalLM"],
                "sliding_window": 4096,
            },
            "sliding window",
        ),
        (
            {
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                "sliding_window": 4096,
                "use_sliding_window": True,
            },
            "sliding window",
        ),
        (
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "mlp_bias": True},
            "MLP biases",
        ),
        (
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "sliding_window": None,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
            },
            "scaled RoPE",
        ),
    ],
)
def test_what_a_family_cannot_run_is_refused(changes, message):
    from orinfer.tiny import tiny_config

    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**tiny_config(), **changes})


def test_a_partly_filled_fused_parameter_is_an_error(tmp_path):
    """A Llama folder missing its v_proj: the fused qkv_proj would be two thirds filled; the load refuses it."""
    folder = as_family(write_tiny_model(tmp_path / "llama"), "llama")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.v_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="qkv_proj"):
        optimize.build(folder, device="cpu", progress=False, kv_tokens=1024)
