"""The oracle (orinfer/oracle.py): transformers' model on the engine's own tensors, for every family's layout."""

import pytest
import torch
from test_families import CHATS, as_family

import optimize
from orinfer import oracle
from orinfer.observe import Observer
from orinfer.tiny import write_tiny_model


@pytest.mark.parametrize("family, tied", [("phi3", False), ("llama", True), ("qwen2", False)])
def test_transformers_on_the_engines_tensors_gives_the_engines_tokens(tmp_path, family, tied):
    """No second copy of the weights: q/k/v and gate/up are views of the fused parameters (the same storage), and
    transformers' greedy tokens on them equal the engine's at fp32."""
    folder = write_tiny_model(tmp_path / family, seed=0, std=0.1, end_boost=3.0)
    if family != "phi3":
        as_family(folder, family, tied)
    gen = optimize.build(folder, device="cpu", progress=False, kv_tokens=4096, observer=Observer())
    hf = oracle.transformers_model(gen.model, folder, "eager")
    ours = dict(gen.model.named_parameters())
    fused = ours["model.layers.0.self_attn.qkv_proj.weight"]
    theirs = dict(hf.named_parameters())
    q = theirs.get(
        "model.layers.0.self_attn.q_proj.weight",
        theirs.get("model.layers.0.self_attn.qkv_proj.weight"),
    )
    assert q.data_ptr() == fused.data_ptr()
    prompts = optimize.prompt_ids(gen.tokenizer, CHATS)
    gen(CHATS, max_new_tokens=16, return_full_text=False)
    eos = set(gen.engine.eos_ids)
    for i, prompt in enumerate(prompts):
        assert oracle.reference_tokens(hf, prompt, 16, eos) == gen.observer.generated[i][:16]
    assert hf.lm_head.weight.data_ptr() == ours["lm_head.weight"].data_ptr()
    if tied:
        assert torch.equal(hf.model.embed_tokens.weight, hf.lm_head.weight)
