"""Model and generation settings read from a local HF folder: Phi-3 and the Llama-family layouts
(families.py)."""

import json
from dataclasses import dataclass
from pathlib import Path

from .families import family_of


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    torch_dtype: str
    # a key of families.FAMILIES: how the checkpoint's names map to the layout
    family: str = "phi3"
    attention_bias: bool = False  # q, k and v have biases (Qwen2)
    tie_word_embeddings: bool = False  # the LM head is the token table

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_heads(self) -> tuple[int, int, int]:
        """(query heads, KV heads, head size): what an attention kernel is built and checked for."""
        return self.num_attention_heads, self.num_key_value_heads, self.head_dim

    @property
    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * d
        layer = (
            qkv * (h + self.attention_bias)
            + self.num_attention_heads * d * h
            + 3 * self.intermediate_size * h
            + 2 * h
        )
        return 2 * self.vocab_size * h + self.num_hidden_layers * layer + h

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token costs across all layers (K and V), at 2 bytes an element."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 2

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """A config.json as transformers 4.x writes it (rope_theta, rope_scaling at the top level)
        or as 5.x does (rope_parameters: rope_type, rope_theta, partial_rotary_factor); what the
        engine does not implement is an error, never a silent default."""
        family_name, family = family_of(raw)
        theta, partial = _rope(raw)
        if raw.get("hidden_act", "silu") != "silu" or raw.get("mlp_bias") or partial != 1.0:
            raise ValueError(
                "unsupported variant (an activation other than SiLU, MLP biases or partial rotary)"
            )
        heads, kv_heads = (
            raw["num_attention_heads"],
            raw.get("num_key_value_heads") or raw["num_attention_heads"],
        )
        if raw["hidden_size"] % heads or heads % kv_heads:
            raise ValueError("hidden_size must divide into heads and heads into key/value heads")
        if raw.get("head_dim") not in (None, raw["hidden_size"] // heads):
            raise ValueError(
                f"head_dim={raw['head_dim']} other than hidden_size / heads is not supported"
            )
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=raw["rms_norm_eps"],
            rope_theta=theta,
            max_position_embeddings=raw["max_position_embeddings"],
            sliding_window=family.window(raw),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype") or "bfloat16",
            family=family_name,
            attention_bias=family.qkv_bias(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings")),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        raw = read_json(path)
        try:
            return cls.from_dict(raw)
        except KeyError as e:
            raise ValueError(
                f"{path}: has no {e.args[0]!r}, which a model's config holds"
            ) from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


def read_json(path: Path) -> dict:
    """A JSON object from a model folder's file; what is not one is a ValueError naming the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text: the file is damaged; copy it again") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}): the file is damaged; copy it "
            "again"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a JSON object: the file is damaged; copy it again")
    return raw


def _rope(raw: dict) -> tuple[float, float]:
    """RoPE's base and rotary fraction, from rope_parameters (transformers 5) or the top level
    (4.x); a scaled RoPE (longrope or su, the 128k variants: their frequencies change per position
    range) is refused."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or (
        params if params.get("rope_type", "default") != "default" else None
    )
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        raise ValueError(f"a scaled RoPE ({kind!r}) is not supported (Phi-3 4k models have none)")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    return float(theta), float(
        params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    )


def eos_token_ids(folder: str | Path, config_eos: int | list | None = None) -> list[int]:
    """The stop tokens generate() uses: generation_config.json's eos_token_id (a list for Phi-3),
    else config.json's."""
    path = Path(folder) / "generation_config.json"
    eos = read_json(path).get("eos_token_id") if path.exists() else None
    if eos is None:
        eos = (
            config_eos
            if config_eos is not None
            else read_json(Path(folder) / "config.json").get("eos_token_id")
        )
    if eos is None:
        raise ValueError(f"{folder}: no eos_token_id in generation_config.json or config.json")
    eos = [eos] if isinstance(eos, int) else eos
    if not (
        isinstance(eos, list)
        and eos
        and all(isinstance(i, int) and not isinstance(i, bool) for i in eos)
    ):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, not {eos!r}")
    return eos
