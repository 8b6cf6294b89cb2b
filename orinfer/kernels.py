"""The elementwise work of a decoder layer: the residual adds, RMSNorm, RoPE and the SiLU gate, in
transformers' order and dtypes.

Eager, each is several PyTorch kernels with float32 temporaries (RMSNorm alone is eight); in a
16k-token prefill pass that memory traffic takes ~40 % as long as the GEMMs (H200). A model is built
with one `Kernels` value: `EAGER`; `compiled()`, torch.compile'd versions, one fused Triton kernel
each, for GPUs whose torch has Triton; or `cuda_extension()`, orinfer's own CUDA kernels (csrc/,
built by extension.py) for CUDA GPUs whose torch has none (NVIDIA's JetPack wheels). The CPU path
stays eager unless asked. Both fused sets round every intermediate as eager does (the compiled ones
through `emulate_precision_casts`), so half-precision values match eager ones too, not only
float32, except where a sum's order differs (RMSNorm's mean).
RMSNorm and RoPE are adapted from transformers' modeling_phi3.py (Apache-2.0); compilation as a
switch around one eager path follows gpt-fast (https://github.com/pytorch-labs/gpt-fast,
BSD-3-Clause).
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    # x * x: pow(2)'s own result, without its kernel module
    x = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual stream after adding x, and its RMSNorm: one kernel when compiled (the sum is
    rounded to x's dtype before the norm reads it, as the two separate operations do)."""
    total = residual + x
    return total, _rms_norm(total, weight, eps)


def _halves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """First and second half of the last dimension of each tensor, in order."""
    half = tensors[0].shape[-1] // 2
    return [part for t in tensors for part in (t[..., :half], t[..., half:])]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin, written half by half: the same roundings in the
    same order (x1*cos - x2*sin, x2*cos + x1*sin), without materialising rotate_half. x [T, heads,
    D] may be a strided view: the model passes the query and key heads of qkv_proj's output
    together, so one kernel rotates both."""
    x1, x2, c1, c2, s1, s2 = _halves(x, cos, sin)
    out = torch.empty_like(x)
    o1, o2 = _halves(out)
    torch.mul(x1, c1, out=o1).sub_(x2 * s1)
    torch.mul(x2, c2, out=o2).add_(x1 * s2)
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up * silu(gate), in place: no extra [tokens, intermediate] buffer."""
    return up.mul_(F.silu(gate, inplace=True))


# The forms torch.compile gets for the two functions above: the same operations without `out=` and
# in-place writes into views (a fused kernel writes its result once; writes into its inputs would be
# extra stores).
def _rope_functional(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2, c1, c2, s1, s2 = _halves(x, cos, sin)
    return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)


def _silu_mul_functional(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return up * F.silu(gate)


@dataclass(frozen=True)
class Kernels:
    """The elementwise functions a model calls."""

    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    silu_mul: Callable
    # fused: the MLP makes one gate_up product (a fused kernel reads its strided halves at full
    # speed)
    fused: bool


EAGER = Kernels("eager", _rms_norm, add_rms_norm, rope, silu_mul, fused=False)


def compile_supported(version: str = torch.__version__) -> bool:
    """This torch fuses the kernels with eager's roundings: torch >= 2.6, whose inductor has
    emulate_precision_casts (2.5 has the setting, but its compiled RoPE and SiLU-gate still differ
    from eager by an ulp; tests/test_kernels.py proves equality on each torch it admits). The one
    version gate: production and the tests ask it."""
    major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 6):
        return False
    import torch._inductor.config as inductor

    return hasattr(inductor, "emulate_precision_casts")


def compile_available(device: torch.device) -> bool:
    """The fused kernels can run on this device: a CUDA device, Triton, and a torch that passes
    compile_supported."""
    if device.type != "cuda" or not compile_supported():
        return False
    from torch.utils._triton import has_triton

    return has_triton()


@lru_cache(maxsize=None)
def compiled() -> Kernels:
    """The fused versions (compiled on first call, once per process for every model using them)."""
    import torch._inductor.config as inductor

    # torch's own setting: without it inductor skips eager's roundings
    inductor.emulate_precision_casts = True
    # Default dynamism: the first token count compiles static kernels, the second a kernel whose
    # token count alone is symbolic, which then serves every pass (warm-up meets several counts).
    # dynamic=True would make the head and feature sizes symbolic too, and Triton could then no
    # longer prove rows contiguous: scalar loads, 3-5x slower.
    return Kernels(
        "compiled",
        torch.compile(_rms_norm),
        torch.compile(add_rms_norm),
        torch.compile(_rope_functional),
        torch.compile(_silu_mul_functional),
        fused=True,
    )


@lru_cache(maxsize=None)
def cuda_extension() -> Kernels:
    """orinfer's CUDA kernels (csrc/elementwise.cuh), once extension.load has registered them in
    this process: CUDA tensors only."""
    ops = torch.ops.orinfer
    return Kernels(
        "CUDA extension", ops.rms_norm, ops.add_rms_norm, ops.rope, ops.silu_mul, fused=True
    )
