"""The fp32 stage: orinfer (one batched call) vs transformers generate at batch 1, fp32, free-running greedy, on
the full-size random model: the token-exact match rate."""

import gc
from pathlib import Path

import torch

import optimize
from orinfer.observe import Observer
from orinfer.options import Options
from workload import hf_model, random_init

# The kernel paths the stage can take: this GPU's defaults, and the Orin's (no Triton: orinfer's
# CUDA extension with its paged attention, or with the padded layout's SDPA, or neither).
PATHS = {
    "default": Options(),
    "orin": Options(compile=False, attention="paged"),
    "orin_padded": Options(compile=False, attention="padded"),
    "orin_eager": Options(compile=False, cuda_extension=False, attention="padded"),
}


def fp32_exact(folder: Path, records: list, new_tokens: int = 32, path: str = "default") -> dict:
    observer = Observer()
    gen = optimize.build(
        folder,
        device="cuda",
        dtype="float32",
        init=random_init(1),
        progress=False,
        observer=observer,
        options=PATHS[path],
    )
    kernels = gen.describe()
    hf = hf_model(gen.model, folder)
    chats = [r["message"] for r in records]
    gen(chats, max_new_tokens=new_tokens, return_full_text=False)
    ours = [observer.generated[i] for i in range(len(chats))]
    prompts = optimize.prompt_ids(gen.tokenizer, chats)
    same, first_diff = 0, []
    for p, o in zip(prompts, ours):
        ids = torch.tensor([p], device="cuda")
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=32000,
        )[0, len(p) :].tolist()
        same += ref == o
        if ref != o:
            first_diff.append(
                next((i for i, (a, b) in enumerate(zip(ref, o)) if a != b), min(len(ref), len(o)))
            )
    del gen, hf
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "path": path,
        "kernels": kernels,
        "items": len(records),
        "new_tokens": new_tokens,
        "exact": same,
        "rate": same / len(records),
        "first_mismatch_positions": first_diff,
    }
