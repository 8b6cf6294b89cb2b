"""orinfer's CUDA extension against the eager kernels it replaces (issue 36): each operator on
Phi-3-medium's shapes in float32, float16 and bfloat16, how many elements differ from eager's and by
how much at most, and each one's time (CUDA events, the median of 50 calls after 5), eager against
the extension. The extension is built first (extension.py), for this GPU and, as a compile check,
for the Orin's sm_87.

    python3 bench/fused_kernels.py --out OUT
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

from measure import median_seconds  # noqa: E402
from orinfer import extension, kernels  # noqa: E402

HIDDEN, FFN, QK_HEADS, DIM, EPS = 5120, 17920, 50, 128, 1e-5
TOKENS = (1, 16, 333, 1024)


def inputs(tokens: int, dtype: torch.dtype) -> dict:
    """The operators' arguments as the model makes them: qk a strided view of qkv_proj's output, gate
    and up the halves of one gate_up product, cos and sin from positions as CausalLM.forward."""
    g = torch.Generator(device="cuda").manual_seed(tokens)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    qkv = randn(tokens, (QK_HEADS + 10) * DIM)
    positions = torch.arange(tokens, device="cuda") * 7 % 4096
    inv_freq = 1.0 / (10000 ** (torch.arange(0, DIM, 2, device="cuda").float() / DIM))
    freqs = positions.float()[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    gate, up = randn(tokens, 2 * FFN).chunk(2, dim=-1)
    return dict(x=randn(tokens, HIDDEN), residual=randn(tokens, HIDDEN),
                weight=(1 + 0.1 * torch.randn(HIDDEN, generator=g, device="cuda")).to(dtype),
                qk=qkv[:, : QK_HEADS * DIM].view(tokens, QK_HEADS, DIM),
                cos=angles.cos().to(dtype), sin=angles.sin().to(dtype), gate=gate, up=up)  # fmt: skip


def calls(k: kernels.Kernels, a: dict) -> dict:
    """Each operator as the model calls it with `k`; eager's SiLU gate writes into up, so it gets
    copies (made outside the timing, below)."""
    return {
        "rms_norm": lambda: (k.rms_norm(a["x"], a["weight"], EPS),),
        "add_rms_norm": lambda: k.add_rms_norm(a["x"], a["residual"], a["weight"], EPS),
        "rope": lambda: (k.rope(a["qk"], a["cos"], a["sin"]),),
        "silu_mul": lambda: (k.silu_mul(a["gate"], a["up"]),),
    }


def median_us(fn) -> float:
    return median_seconds(fn, 50, warmups=5) * 1e6


def compare(dtype: torch.dtype, tokens: int) -> dict:
    a = inputs(tokens, dtype)
    fused = calls(kernels.cuda_extension(), a)
    rows = {}
    for name, run in fused.items():
        # eager's SiLU gate writes into copies (the eager MLP's two products)
        want = calls(kernels.EAGER, dict(a, gate=a["gate"].clone(), up=a["up"].clone()))[name]()
        got = run()
        diff = [(w.float() - o.float()).abs() for w, o in zip(want, got)]
        eager_args = dict(a, gate=a["gate"].clone(), up=a["up"].clone())
        rows[name] = {
            "differing": sum(int((d != 0).sum()) for d in diff),
            "elements": sum(d.numel() for d in diff),
            "max_abs_diff": max(float(d.max()) for d in diff),
            "eager_us": median_us(calls(kernels.EAGER, eager_args)[name]),
            "extension_us": median_us(run),
        }
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    major, minor = torch.cuda.get_device_capability()
    t = time.perf_counter()
    extension.load(f"{major}.{minor}")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "build_s": time.perf_counter() - t}  # fmt: skip
    t = time.perf_counter()
    report["sm_87_library"] = str(extension.build("8.7"))
    report["sm_87_build_s"] = time.perf_counter() - t
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for tokens in TOKENS:
            key = f"{str(dtype).removeprefix('torch.')}_{tokens}"
            report[key] = compare(dtype, tokens)
            print(key, json.dumps(report[key]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fused_kernels.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
