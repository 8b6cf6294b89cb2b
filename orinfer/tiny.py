"""A tiny random Phi-3 written as an ordinary HF folder: the --demo model and the test models.

Same architecture and the real Phi-3 tokenizer (shipped in orinfer/assets), with small dimensions
and seeded random weights, so it loads through exactly the path a real checkpoint takes, on any CPU,
in a second.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import check_checkpoint

ASSETS = Path(__file__).parent / "assets"
END_TOKEN = 32007  # <|end|>, the token Phi-3 ends its turn with


def tiny_config(**overrides) -> dict:
    cfg = json.loads((ASSETS / "config.json").read_text())
    cfg.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        torch_dtype="float32",
        _name_or_path="tiny-random-phi3",
    )
    cfg.pop("auto_map", None)  # never remote code
    cfg.update(overrides)
    return cfg


def tiny_weights(cfg: dict, seed: int, std: float, end_boost: float) -> dict[str, torch.Tensor]:
    """normal(0, std) matrices, ones for norms. `end_boost` > 0 makes <|end|> the lm_head row most
    aligned with the final hidden state now and then, so some sequences stop early while others run
    on."""
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d

    def normal(*shape):
        return torch.randn(*shape, generator=g) * std

    w = {
        "model.embed_tokens.weight": normal(v, h),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": normal(v, h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update(
            {
                p + "self_attn.qkv_proj.weight": normal(qkv, h),
                p + "self_attn.o_proj.weight": normal(h, h),
                p + "mlp.gate_up_proj.weight": normal(2 * inter, h),
                p + "mlp.down_proj.weight": normal(h, inter),
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
            }
        )
    if end_boost:
        w["lm_head.weight"][END_TOKEN] *= end_boost
    return w


def write_tiny_model(
    folder: str | Path,
    seed: int = 0,
    std: float = 0.1,
    end_boost: float = 0.0,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**config_overrides)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(ASSETS / "generation_config.json", folder / "generation_config.json")
    for f in (ASSETS / "phi3-tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    weights = {
        k: t.to(dtype).contiguous() for k, t in tiny_weights(cfg, seed, std, end_boost).items()
    }
    names = sorted(weights)
    if shards == 1:
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: weights[k] for k in part}, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


DEMO = dict(seed=0, std=0.1, end_boost=3.0)


def demo_model_dir() -> Path:
    """The --demo model, built once in the user's cache directory (atomically, so a crash leaves no
    half folder); a cached folder that is no longer whole (a file cut or removed) is rebuilt. An
    OSError when the cache cannot be written (HOME a file, or read-only)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orinfer"
    folder = root / "tiny-random-phi3-v1"
    if folder.exists() and not _whole(folder):
        print(f"{folder}: the cached demo model is damaged: building it again", file=sys.stderr)
        shutil.rmtree(folder)
    if not folder.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        write_tiny_model(tmp, **DEMO)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _whole(folder: Path) -> bool:
    """Every file the demo writes is there, its config reads, its checkpoint matches its header."""
    expected = [
        "config.json",
        "generation_config.json",
        *(f.name for f in (ASSETS / "phi3-tokenizer").iterdir()),
    ]
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
        check_checkpoint(folder)
    except (OSError, ValueError):
        return False
    return all((folder / name).is_file() for name in expected)
