"""Attention over the paged KV cache, as the model's layers see it, and the contract every backend
keeps.

Each layer writes its new K/V into the cache, then the pass's layout reads them back and runs its
kernel. One forward pass carries a flat list of new tokens from several sequences (prefill chunks,
decode steps with or without drafts). `Context` is the only thing the runner hands to the model:
each new token's position and cache slot, the rows to sample, and the pass's layout: an object with
`prepare(dtype)` (once a pass: a mask, say) and `attend(q, k_rows, v_rows)`, whose tensor fields
declared with `per_pass()` are what a CUDA graph's replay refreshes (graphs.py). A `Backend`
declares how its layout is built and what it costs; the registry is attention/__init__.py.
"""

from dataclasses import dataclass, field, fields
from typing import Callable, Protocol

import torch

from ..memory import GRAPH_PASS_TOKENS

# cuBLAS picks a GEMM kernel by the exact token count, and the first use of a kernel in a process
# stalls the host until the device is idle, then for milliseconds more. So an eager pass of more
# than PAD_ABOVE tokens (graphs take the smaller ones, at their own sizes) is padded to a multiple
# of PAD_MULTIPLE tokens and sampled rows, and the warm-up meets every such count
# (warmup.meet_gemm_kernels).
PAD_ABOVE, PAD_MULTIPLE = GRAPH_PASS_TOKENS, 64


def per_pass(default=None):
    """A tensor field of a pass's inputs whose values change from pass to pass at one shape: a CUDA
    graph's replay copies it into the captured pass's tensors; the other tensor fields depend on the
    shape alone."""
    return field(default=default, metadata={"per_pass": True})


def per_pass_fields(obj) -> list[str]:
    """The names of `obj`'s per_pass() fields."""
    return [f.name for f in fields(obj) if f.metadata.get("per_pass")]


class Layout(Protocol):
    def prepare(self, dtype: torch.dtype) -> None: ...

    def attend(
        self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass
class Context:
    positions: torch.Tensor = per_pass()  # [T] position of each new token
    # [T] row of the flat cache (block * block_size + offset) its K/V goes to
    slots: torch.Tensor = per_pass()
    sample_rows: torch.Tensor = per_pass()  # [S] flat tokens whose next-token logits are wanted
    layout: Layout = None


def as_words(x: torch.Tensor) -> torch.Tensor:
    """The same bytes as 8-byte words where the last dimension allows: index kernels copy one
    element per thread step, so gathering 2-byte elements is 4x slower than gathering words."""
    return x.view(torch.int64) if x.shape[-1] * x.element_size() % 8 == 0 else x


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: Context,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]. Returns [T, H * D]."""
    kv_heads, dim = k.shape[1], k.shape[2]
    # Write first, then read: a sequence may read blocks that another sequence in this same pass is
    # filling (a shared prompt prefix), and its own new tokens must be visible to it.
    k_rows, v_rows = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    # as words: the same bytes in a quarter of the thread steps (index_copy_ moves an element a
    # step)
    as_words(k_rows).index_copy_(0, ctx.slots, as_words(k))
    as_words(v_rows).index_copy_(0, ctx.slots, as_words(v))
    return ctx.layout.attend(q, k_rows, v_rows)


@dataclass(frozen=True)
class Backend:
    """An attention backend, as the runner, the engine and the memory plan see it: they read these
    fields and never the backend's name. `kernels(device, dtype, heads, kv_heads, dim,
    packed_queries)` gives what its layout calls, checked once on this device, or None where they do
    not run here; `layout(kernels, uploader, cfg, max_gather_tokens, pad_above, pad_multiple)`
    builds the runner's per-pass layout (its `build` lays out a pass, its graphs' shapes and
    padding). `host_bytes`: host memory its kernels cost once loaded (booked where the host shares
    the budget, which may not afford it). `gathers_whole_pass`: it gathers every sequence's keys of
    a pass at once, so the scheduler bounds sequences x longest context (else it gathers in groups
    within the plan's bound). `graphs_every_small_pass`: its CUDA graphs take any pass of up to
    1,024 tokens (else plain decode passes only, and the warm-up meets every small GEMM count
    eagerly). `pads_eager_passes`: an eager pass above 1,024 tokens is padded to a multiple of 64 so
    that the warm-up meets its GEMM shapes. `devices`: the device types it can run on (its kernels
    still check that they run here). `needs_cuda_extension`: its kernels are orinfer's CUDA
    extension's (extension.py), taken only where Options.cuda_extension resolved on."""

    name: str
    kernels: Callable
    layout: Callable
    devices: tuple[str, ...] = ("cuda", "cpu")
    host_bytes: int = 0
    gathers_whole_pass: bool = False
    graphs_every_small_pass: bool = False
    pads_eager_passes: bool = True
    needs_cuda_extension: bool = False
