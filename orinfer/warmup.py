"""What the engine's warm-up (Engine.warmup, before the clock) does on the device besides capturing
graphs: meet every GEMM kernel a pass can ask for, measure how many tokens a pass takes at one
token's cost, and the probe of competition-shaped requests that grows the allocators' pools. Nothing
here sees the data."""

import random
import time

import torch

from .model import CausalLM
from .sequence import Sequence


@torch.inference_mode()
def meet_gemm_kernels(
    model: CausalLM,
    max_tokens: int,
    max_sampled: int,
    eager_padding: tuple[int, int] | None,
    every_small_count: bool = False,
) -> None:
    """Run every GEMM of a layer and the LM head once at each token count a pass can bring, up to
    `max_tokens` tokens and `max_sampled` sampled rows (after the last layer's attention, the
    sampled rows alone go on). `eager_padding` (above, multiple): eager passes of more than `above`
    tokens come padded to a multiple of `multiple`; `every_small_count`: passes of up to `above`
    tokens run eagerly at any count (no graphs take them), so every count is met (gemm_counts). An
    MLP that takes its rows in parts (the model's mlp_rows) meets part sizes only.

    cuBLAS picks its kernel by the exact token count, and a kernel's first use in a process holds up
    the host launching a pass: without this the first timed call spent 0.88 s inside `linear`
    against 0.11 s in later calls (H200)."""
    layer = model.model.layers[0]
    mlp_rows = layer.mlp.rows or max(max_tokens, max_sampled)

    def counts(most: int) -> list[int]:
        return gemm_counts(most, eager_padding, every_small_count)

    def zeros(n: int, features: int) -> torch.Tensor:
        return torch.zeros(n, features, device=model.device, dtype=model.dtype)

    # Largest first: each count's tensors then fit in blocks the allocator already holds (ascending,
    # every new size took new memory, up to the whole GPU).
    for n in reversed(counts(max_tokens)):
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj):
            linear(zeros(n, linear.in_features))
        if n <= mlp_rows:
            # its own path: one gate_up product when compiled, two eager
            layer.mlp(zeros(n, model.cfg.hidden_size))
    for n in reversed(counts(max_sampled)):  # after the last layer's attention, sampled rows only
        layer.self_attn.o_proj(zeros(n, layer.self_attn.o_proj.in_features))
        if n <= mlp_rows:
            layer.mlp(zeros(n, model.cfg.hidden_size))
        model.lm_head(zeros(n, model.cfg.hidden_size)).argmax(-1)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        # Its many odd-sized blocks would stay cached beside the ones the real passes need: give
        # them back (on a 32 GB Orin's plan they raised the device peak by ~30 MiB).
        torch.cuda.empty_cache()


def gemm_counts(
    most: int, eager_padding: tuple[int, int] | None, every_small_count: bool = False
) -> list[int]:
    """The token counts up to `most` the warm-up runs through each GEMM: with `eager_padding`
    (above, multiple), every multiple above `above` (what padded passes bring) and, below it, every
    count where small passes run eagerly (`every_small_count`: the Orin's plan) or a geometric
    ladder where graphs take them at their own sizes; without padding, a geometric ladder only (a
    CPU, which loads no kernels)."""
    found = {int(1.25**k) for k in range(64) if 1.25**k <= most} | {most}
    if eager_padding is not None:
        above, multiple = eager_padding
        small = (
            range(1, min(above, most) + 1)
            if every_small_count
            else [c for c in found if c <= above]
        )
        found = set(small) | set(range(multiple, most + multiple, multiple))
    return sorted(found)


@torch.inference_mode()
def tokens_at_one_token_cost(model: CausalLM, most: int, slack: float = 1.1) -> int:
    """The most tokens (of a few sizes up to `most`) whose pass through one layer's GEMMs takes no
    longer than one token's, within `slack`, timed here: a pass reads every weight once whatever its
    size, so up to there more tokens cost nothing (the device's FLOP-to-byte ratio: ~130 on an Orin,
    more on an H200)."""
    layer = model.model.layers[0]
    linears = (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    )

    def seconds(n: int) -> float:
        xs = [
            torch.randn(n, linear.in_features, device=model.device, dtype=model.dtype)
            for linear in linears
        ]
        return seconds_per_call(
            model.device, lambda: [linear(x) for linear, x in zip(linears, xs)], 5
        )

    one = seconds(1)
    sizes = (16, 32, 64, 96, 128, 192, 256, 384, 512)
    return max([1] + [n for n in sizes if n <= most and seconds(n) <= slack * one])


def seconds_per_call(device: torch.device, work, reps: int) -> float:
    """Seconds one call of `work` takes on `device`: the mean of `reps` calls after one untimed call
    (its kernels met), timed by CUDA events on a GPU."""
    work()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t = time.perf_counter()
    for _ in range(reps):
        work()
    return (time.perf_counter() - t) / reps


def probe(max_batched_tokens: int, max_num_seqs: int) -> list[Sequence]:
    """Requests shaped like a competition run (random token ids, never the data): prompts of 40-200
    tokens sharing a 40-token instruction, three passes of them, three new tokens each."""
    rng = random.Random(0)
    shared = [100 + j for j in range(40)]
    seqs, queued = [], 0
    while queued < 3 * max_batched_tokens and len(seqs) < max_num_seqs:
        tokens = shared + [rng.randrange(200, 30000) for _ in range(rng.randint(0, 160))]
        seqs.append(
            Sequence(
                index=-1 - len(seqs),
                token_ids=tokens,
                num_prompt_tokens=len(tokens),
                max_new_tokens=3,
            )
        )
        queued += len(tokens)
    return seqs
