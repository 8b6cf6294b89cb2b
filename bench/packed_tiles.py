"""White-box micro-benchmark (it drives engine parts directly; bench/README.md).
The packed attention kernel on decode, draft and prompt-chunk shapes (a CUDA GPU with Triton): one layer call of
packed_attention() against a single launch of 64-row tiles for every sequence (the kernel before it took decode
steps in 16-row tiles), 50 calls each, in one process.

    python3 bench/packed_tiles.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from measure import device_ms_per_call  # noqa: E402
from orinfer.attention import packed as pa  # noqa: E402

HEADS, KV_HEADS, DIM = 40, 10, 128  # Phi-3-medium
SHAPES = (
    (500, 1, 330),
    (500, 1, 200),
    (128, 1, 330),
    (16, 17, 1200),
    (8, 4, 1500),
    (64, 45, 120),
    (1, 1, 4000),
)


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    for count, new, keys in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        rows = count * keys + 10
        k = torch.randn(rows, KV_HEADS, DIM, device=dev, dtype=dt, generator=g)
        v = torch.randn_like(k)
        q = torch.randn(count * new, HEADS, DIM, device=dev, dtype=dt, generator=g)
        cu_q = (torch.arange(count + 1, device=dev) * new).int()
        cu_k = (torch.arange(count + 1, device=dev) * keys).int()
        slots = torch.randperm(rows, device=dev, generator=g)[: count * keys]
        base, ours = torch.empty_like(q), torch.empty_like(q)
        t_base = device_ms_per_call(
            lambda: pa.launch(q, k, v, base, cu_q, cu_k, slots, 0, count, DIM**-0.5, pa.ONE_LAUNCH)
        )
        t_ours = device_ms_per_call(
            lambda: pa.packed_attention(q, k, v, ours, cu_q, cu_k, slots, 0, count, DIM**-0.5)
        )
        print(
            f"{count} sequences x {new} new tokens x {keys} keys: single launch {t_base:.4f} ms, "
            f"packed_attention {t_ours:.4f} ms ({t_ours / t_base:.2f}x); "
            f"max |difference| {(base.float() - ours.float()).abs().max().item():.1e}",
            flush=True,
        )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
