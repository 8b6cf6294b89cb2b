"""White-box micro-benchmark (it drives engine parts directly; bench/README.md).
Host memory (anonymous and file-backed RSS) that the first call of each kind of kernel adds: CUDA loads a kernel's
module on first use, and on a unified-memory board that host memory comes out of the same budget as the KV cache.
`python3 bench/kernel_host_memory.py STEPS` (a CUDA GPU; STEPS comma-separated, run in that order in one fresh
process: matmul, sdpa_efficient, sdpa_math, sdpa_flash, elementwise, or one kernel: e_pow, e_repint, e_cmp, ...)."""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def split():
    f = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmHWM"):
            f[k] = int(v.split()[0]) / 1024
    return f


dev = "cuda"
torch.cuda.init()
out = [("cuda_init", split())]
x = torch.randn(256, 5120, device=dev, dtype=torch.bfloat16)
w = torch.randn(7680, 5120, device=dev, dtype=torch.bfloat16)
B, H, Q, K, D = 23, 10, 4 * 4, 1024, 128
q = torch.randn(B, H, Q, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(B, H, K, D, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
bias = torch.zeros(B, 1, Q, K, device=dev, dtype=torch.bfloat16)
steps = {
    "matmul": lambda: F.linear(x, w),
    "sdpa_efficient": lambda: (
        sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]).__enter__()
        or F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ),
    "sdpa_math": lambda: torch.softmax((q @ k.transpose(-1, -2)) * D**-0.5 + bias, -1) @ v,
    "sdpa_flash": lambda: (
        sdpa_kernel([SDPBackend.FLASH_ATTENTION]).__enter__()
        or F.scaled_dot_product_attention(q, k, v)
    ),
    "elementwise": lambda: [
        x.float().pow(2).mean(-1, keepdim=True),
        torch.rsqrt(x.float()),
        x * x,
        x + x,
        torch.cat([x, x], -1),
        x.float().cos(),
        x.float().sin(),
        x.argmax(-1),
        torch.arange(10, device=dev).repeat_interleave(
            torch.ones(10, dtype=torch.long, device=dev)
        ),
        torch.cumsum(torch.ones(10, device=dev, dtype=torch.long), 0),
        F.silu(x),
        torch.zeros(100, 5120, device=dev, dtype=torch.bfloat16).index_copy_(
            0, torch.arange(10, device=dev), x[:10]
        ),
        torch.where(x > 0, x, 0),
        x.masked_fill(x > 0, 1),
        F.embedding(torch.arange(10, device=dev), x),
    ],
}
i = torch.arange(10, device=dev)
ones = torch.ones(10, dtype=torch.long, device=dev)
xf = x.float()
steps.update(
    {
        "e_float": lambda: x.float(),
        "e_pow": lambda: xf.pow(2),
        "e_mean": lambda: xf.mean(-1, keepdim=True),
        "e_add": lambda: xf + 1e-5,
        "e_rsqrt": lambda: torch.rsqrt(xf),
        "e_mul": lambda: xf * xf,
        "e_to": lambda: xf.to(torch.bfloat16),
        "e_mulbf": lambda: x * x,
        "e_addbf": lambda: x + x,
        "e_cat": lambda: torch.cat([x, x], -1),
        "e_cos": lambda: xf.cos(),
        "e_sin": lambda: xf.sin(),
        "e_argmax": lambda: x.argmax(-1),
        "e_repint": lambda: i.repeat_interleave(ones),
        "e_cumsum": lambda: torch.cumsum(ones, 0),
        "e_silu": lambda: F.silu(x),
        "e_arange": lambda: torch.arange(5, device=dev),
        "e_index_copy": lambda: torch.zeros(
            100, 5120, device=dev, dtype=torch.bfloat16
        ).index_copy_(0, i, x[:10]),
        "e_where": lambda: torch.where(x > 0, x, 0),
        "e_masked_fill": lambda: x.masked_fill(x > 0, 1),
        "e_index": lambda: x[i],
        "e_embedding": lambda: F.embedding(i, x),
        "e_cmp": lambda: (i <= ones) & (i < 3) | (i == 0),
        "e_zeros": lambda: torch.zeros(100, device=dev),
        "e_copy_strided": lambda: x.t().contiguous(),
        "e_floordiv": lambda: i // 3,
        "e_rem": lambda: i % 3,
        "e_full": lambda: torch.full((99,), -1.0, device=dev),
        "e_unfold_index": lambda: torch.zeros(99, device=dev, dtype=torch.bfloat16).unfold(
            0, 50, 1
        )[i[:, None]],
        "e_int_add": lambda: (i + 1) * 2 - ones,
        "e_slice_fill": lambda: torch.zeros(99, device=dev).__setitem__(slice(3, 9), 0),
    }
)
for name in sys.argv[1].split(","):
    steps[name]()
    torch.cuda.synchronize()
    out.append((name, split()))
prev = None
for name, f in out:
    d = (
        ""
        if prev is None
        else " (+%.0f anon MiB, +%.0f file)"
        % (f["RssAnon"] - prev["RssAnon"], f["RssFile"] - prev["RssFile"])
    )
    print(
        "%-16s anon %6.0f file %6.0f hwm %6.0f%s"
        % (name, f["RssAnon"], f["RssFile"], f["VmHWM"], d)
    )
    prev = f
