"""The paged layout: orinfer's CUDA kernel (csrc/attention.cuh, built with the extension) reads each
sequence's keys and values where they lie in the paged cache, through its block table, so no layer
gathers them into a grid, pads queries or builds a mask (the padded layout's gathers and copies
were most of the Orin path's work besides its GEMMs: BENCHMARKS.md, issue 36). The pass's new
tokens are cut into tiles of up to TILE_TOKENS consecutive tokens of one sequence; the kernel runs
a block per tile and KV head, and applies the causal mask and the sliding window itself.

This file holds the per-pass object the attention layers read (Paged), how a pass is cut into
tiles (PagedLayout: the padded layout's order, padding and graph shapes, tiles in place of
grids), the kernel's check, and the backend's declaration (BACKEND).
"""

from array import array
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

import torch

from ..integers import ceil_div
from ..sequence import Work
from .core import Backend, per_pass
from .padded import PaddedLayout, layout_of
from .reference import reference_paged

TILE_TOKENS = 16  # a tile's rows: one tensor-core product's (kTileRows in csrc/attention.cuh)
HEAD_DIMS = (16, 32, 64, 96, 128)  # the head dimensions the kernel is built for
MOST_GROUPS = 8  # query heads a KV head: a warp each


@dataclass
class Paged:
    """What the attention layers read of one paged pass."""

    kernel: Callable
    block_size: int
    window: int  # the sliding window; 0: none
    tiles: torch.Tensor = per_pass()  # [n, 4] (first flat token, tokens, first position, row)
    block_tables: torch.Tensor = per_pass()  # [B, nblocks] every sequence's cache blocks, in order

    def prepare(self, dtype: torch.dtype) -> None:
        """Nothing a pass: the kernel masks as it reads."""

    def attend(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
        """q [T, H, D]; the caches as flat rows [slots, Hkv, D], this pass's K/V already written.
        Returns [T, H * D]."""
        return self.kernel(q, k_rows, v_rows, self.tiles, self.block_tables, self.block_size,
                           self.window, q.shape[-1] ** -0.5)  # fmt: skip


class PagedLayout(PaddedLayout):
    """The padded layout's order, padding and graph shapes (plain decode passes), with tiles in
    place of grids: nothing is gathered, so any graph shape is capturable."""

    name = "paged tiles, keys read in place"

    def capturable(self, size: int, extent: int, max_gather_tokens: int) -> bool:
        return True

    def build(self, works: list[Work], shape: tuple[int, int] | None, feed: torch.Tensor | None):
        """The works in their own order, padded as the padded layout pads them; each sequence's new
        tokens cut into tiles of up to TILE_TOKENS."""
        order = list(range(len(works)))
        ids, sample_rows, starts, lens = self._padded(works, order, shape)
        nblocks = (
            shape[1]
            if shape is not None
            else max(ceil_div(s + n, self.block_size) for s, n in zip(starts, lens))
        )
        tiles, token = array("q"), 0
        for row, (start, n) in enumerate(zip(starts, lens)):
            for at in range(0, n, TILE_TOKENS):
                tiles += array("q", (token + at, min(TILE_TOKENS, n - at), start + at, row))
            token += n
        t = self.uploader.upload(works, order, ids, sample_rows, starts, lens, nblocks, tiles, feed)
        return t, Paged(
            kernel=self.kernels,
            block_size=self.block_size,
            window=self.sliding_window or 0,
            tiles=t.layout.view(-1, 4),
            block_tables=t.tables,
        )


def _check_case(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, dim: int):
    """A small pass for the kernel's check: two sequences in 4-token blocks, one of 40 new tokens
    after a 30-token prefix (three tiles, keys in three chunks) and one decode step at position 9;
    a 25-token sliding window. (q, k_rows, v_rows, tiles, tables, block_size, window)"""
    g = torch.Generator(device=device).manual_seed(0)
    block_size, window = 4, 25
    k_rows, v_rows = (
        torch.randn(40 * block_size, kv_heads, dim, device=device, dtype=dtype, generator=g)
        for _ in range(2)
    )
    q = torch.randn(41, heads, dim, device=device, dtype=dtype, generator=g)
    tables = torch.tensor([list(range(1, 19)), [30, 25, 20] + [0] * 15], device=device)
    tiles = torch.tensor(
        [[0, 16, 30, 0], [16, 16, 46, 0], [32, 8, 62, 0], [40, 1, 9, 1]], device=device
    )
    return q, k_rows, v_rows, tiles, tables, block_size, window


def loaded_kernel(device: torch.device, heads: int, kv_heads: int, dim: int) -> Callable | None:
    """The extension's kernel where it can run this shape here, unchecked; None where it cannot (the
    extension not loaded in this process, a GPU before sm_80, a head size or grouping it is not
    built for)."""
    if (
        device.type != "cuda"
        or dim not in HEAD_DIMS
        or heads % kv_heads
        or heads // kv_heads > MOST_GROUPS
        or torch.cuda.get_device_capability(device) < (8, 0)
    ):
        return None
    try:
        return torch.ops.orinfer.paged_attention
    except (AttributeError, RuntimeError):  # the extension is not loaded in this process
        return None


def kernel_difference(
    kernel: Callable, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, dim: int
) -> tuple[bool, float]:
    """Whether `kernel` agrees with the float32 reference on _check_case's pass, within the dtype's
    tolerance, and its largest difference there."""
    case = _check_case(device, dtype, heads, kv_heads, dim)
    scale = dim**-0.5
    out = kernel(*case, scale).float()
    expected = reference_paged(*case, scale).float()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    agrees = torch.allclose(out, expected, atol=tolerance, rtol=tolerance)
    return agrees, (out - expected).abs().max().item()


@lru_cache(maxsize=None)
def paged_kernel(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, packed_queries=0
) -> Callable | None:
    """The extension's kernel where it runs here and agrees with the float32 reference on a small
    case (asked once per device, dtype and shape); None where it does not."""
    kernel = loaded_kernel(device, heads, kv_heads, dim)
    if kernel is None:
        return None
    return kernel if kernel_difference(kernel, device, dtype, heads, kv_heads, dim)[0] else None


BACKEND = Backend(
    "paged",
    kernels=paged_kernel,
    layout=partial(layout_of, PagedLayout),
    devices=("cuda",),
    needs_cuda_extension=True,
)
