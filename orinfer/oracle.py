"""The oracle: transformers' own model for a folder, on the engine's very weights, and its greedy
tokens at batch 1. The tests, the self-check and the benchmark hold the engine to it."""

import json
from pathlib import Path

import torch

from .families import fused_rows, weight_targets


def own_modeling_code(folder) -> bool:
    """Whether the folder carries the modeling code its config maps (Phi-3-medium's does): the
    organisers' trust_remote_code=True load runs that code, so the reference does too; elsewhere
    transformers' own class."""
    target = (
        json.loads((Path(folder) / "config.json").read_text())
        .get("auto_map", {})
        .get("AutoModelForCausalLM")
    )
    return bool(target) and (Path(folder) / (target.split(".")[0] + ".py")).is_file()


def dtype_argument(dtype: torch.dtype) -> dict:
    """transformers' keyword for a model's dtype: `dtype` since 5.0, `torch_dtype` before (4.44.2,
    the Jetson image's, has no `dtype`)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {("dtype" if major >= 5 else "torch_dtype"): dtype}


def transformers_model(model, folder, attention: str):
    """transformers' causal LM for this folder (its own modeling code where it carries one:
    own_modeling_code) on the very same weight tensors as `model`: no second copy of the weights (a
    family's separate projections are views of the engine's fused ones). A token table the engine
    reads from the file is read onto the device for it; RoPE buffers are the engine's."""
    import transformers

    own = own_modeling_code(folder)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=own)
    config._attn_implementation = attention
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(
            config, trust_remote_code=own, **dtype_argument(model.dtype)
        )
    hf.load_state_dict(_their_state(model, hf), assign=True, strict=True)
    if model.cfg.tie_word_embeddings:
        hf.tie_weights()
    for module in hf.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta and name in ("inv_freq", "original_inv_freq"):
                module.register_buffer(name, model.inv_freq.clone(), persistent=False)
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(
            module, "_set_cos_sin_cache"
        ):
            # transformers 4.x's Qwen2 and Mistral keep cos/sin tables, built from inv_freq in their
            # __init__
            module._set_cos_sin_cache(
                module.max_seq_len_cached, model.device, torch.get_default_dtype()
            )
    hf.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return hf.eval()


def _their_state(model, hf) -> dict:
    """transformers' parameter names mapped to the engine's tensors (families.weight_targets), as
    views."""
    cfg, ours = model.cfg, dict(model.state_dict())
    split, state = fused_rows(cfg), {}
    for name, meta in hf.state_dict().items():
        target, row = weight_targets(name, cfg.family, split, False)[0]
        if cfg.tie_word_embeddings and name == "model.embed_tokens.weight":
            target = "lm_head.weight"  # the engine's copy of the table, on the device
        # the token table, kept in the file by the memory plan
        if target not in ours or ours[target].is_meta:
            ours[target] = _table_on_device(model, target)
        state[name] = ours[target][row : row + len(meta)] if meta.dim() else ours[target]
    return state


def _table_on_device(model, name: str) -> torch.Tensor:
    rows = model.get_submodule(name.rpartition(".")[0]).rows  # loader.FileRows
    table = torch.empty(rows.shape, dtype=model.dtype, device=model.device)
    # a few MiB of host memory at a time, not the whole table
    for first in range(0, rows.shape[0], 4096):
        ids = torch.arange(first, min(first + 4096, rows.shape[0]))
        table[first : first + len(ids)] = rows(ids).to(model.device)
    return table


def reference_tokens(hf, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    """transformers' greedy new tokens at batch 1, to its end token."""
    ids = torch.tensor([prompt], device=hf.device)
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=hf.generation_config.pad_token_id or 0,
        )[0, len(prompt) :].tolist()
    end = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
    return out[:end]


def top2_margin(hf, prefix: list[int]) -> float:
    """transformers' top-2 logit margin after `prefix`."""
    with torch.no_grad():
        top = hf(torch.tensor([prefix], device=hf.device)).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])
