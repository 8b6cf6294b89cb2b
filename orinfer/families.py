"""Model families: the config.json folders the engine runs, and how each one's checkpoint names map
onto the engine's one layout (Phi-3's: q, k and v fused into `qkv_proj`, gate and up into
`gate_up_proj`).

Every family here is the same decoder (RMSNorm, RoPE, grouped KV heads, a SiLU-gated MLP), so a
family is a name table and a few switches, read from its config: whether the projections are stored
fused, whether q, k and v carry biases, whether the LM head is the token table, and which sliding
window transformers applies. The loader fuses as it streams (each stored tensor is copied into its
rows of the fused parameter: no host copy of the checkpoint). A new family of this decoder is one
entry in FAMILIES; structure gpt-fast's and nano-vllm's model tables share.
"""

from dataclasses import dataclass
from typing import Callable

# Separate projections (Llama's names) and the rows of the fused parameter each fills, in order.
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


@dataclass(frozen=True)
class Family:
    """`fused`: q/k/v and gate/up stored fused, as the engine holds them (Phi-3), or separately
    (Llama). `qkv_bias`: whether q, k and v have biases, from the config. `window`: the sliding
    window the family's transformers attention applies (None: none), or a ValueError for one the
    engine does not implement."""

    architecture: str
    fused: bool
    qkv_bias: Callable[[dict], bool]
    window: Callable[[dict], int | None]


def _no_window(raw: dict) -> None:
    return None


def _window_unless_used(flag: str | None) -> Callable[[dict], None]:
    """A family whose sliding window, where its config turns one on, the engine does not implement
    (Mistral's and Qwen2's masks differ from Phi-3's): refused rather than run with other attention.
    """

    def window(raw: dict) -> None:
        used = raw.get("sliding_window") is not None and (flag is None or raw.get(flag))
        if used:
            raise ValueError(
                f"a sliding window ({raw['sliding_window']}) in a {raw.get('model_type')} model is "
                "not supported"
            )
        return None

    return window


def _phi3_window(raw: dict) -> int | None:
    return raw.get("sliding_window")


def _config_flag(key: str) -> Callable[[dict], bool]:
    return lambda raw: bool(raw.get(key))


FAMILIES = {
    "phi3": Family(
        "Phi3ForCausalLM", fused=True, qkv_bias=_config_flag("attention_bias"), window=_phi3_window
    ),
    "llama": Family(
        "LlamaForCausalLM", fused=False, qkv_bias=_config_flag("attention_bias"), window=_no_window
    ),
    "mistral": Family(
        "MistralForCausalLM",
        fused=False,
        qkv_bias=lambda raw: False,
        window=_window_unless_used(None),
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        fused=False,
        qkv_bias=lambda raw: True,
        window=_window_unless_used("use_sliding_window"),
    ),
}


def family_of(raw: dict) -> tuple[str, Family]:
    """The family a config.json names (model_type and architectures agree), or a ValueError listing
    the supported."""
    name = raw.get("model_type")
    family = FAMILIES.get(name)
    archs = raw.get("architectures") or ([family.architecture] if family else None)
    if family is None or archs != [family.architecture]:
        supported = ", ".join(f"{f.architecture} ({n})" for n, f in FAMILIES.items())
        raise ValueError(
            f"model_type={name!r} architectures={archs!r} is not supported; supported: {supported}"
        )
    return name, family


def weight_targets(
    name: str, family: str, split: dict[str, list[int]], tied: bool
) -> list[tuple[str, int]]:
    """Where a checkpoint tensor goes: (the engine's parameter, the first of its rows the tensor
    fills), one or more. `split`: each fused projection's row counts in order
    ({"self_attn.qkv_proj": [q, k, v], ...}); `tied`: the LM head is the token table (it gets the
    table's copy)."""
    targets = [(name, 0)]
    if not FAMILIES[family].fused:
        for fused, parts in _FUSED.items():
            for i, part in enumerate(parts):
                if f".{part}." in name:
                    targets = [(name.replace(part, fused), sum(split[fused][:i]))]
    if tied and name == "model.embed_tokens.weight":
        targets.append(("lm_head.weight", 0))
    return targets


def fused_rows(cfg) -> dict[str, list[int]]:
    """Each fused projection's row counts in order, for a ModelConfig: weight_targets' `split`."""
    kv = cfg.num_key_value_heads * cfg.head_dim
    return {
        "self_attn.qkv_proj": [cfg.num_attention_heads * cfg.head_dim, kv, kv],
        "mlp.gate_up_proj": [cfg.intermediate_size] * 2,
    }
