"""The varlen layout: the flat queries as they are, each sequence's keys gathered into one flat run,
and cumulative lengths; FlashAttention's variable-length kernel (CUDA, fp16/bf16, a torch built with
it) takes them, and where Triton runs, sequences with few new tokens go to the packed kernel instead
(packed.py), which fills its tiles better. The kernel aligns the causal mask bottom-right (a query
at the end of a cached prefix sees the prefix) and handles the grouped KV heads itself: no padding,
no mask, no copies of the queries or the output.

This file holds all of it: the kernels and their check, the per-pass object the attention layers
read (Varlen), how a pass is laid out for it and padded to a CUDA graph's shape (VarlenLayout), the
graphs' shape buckets, and the backend's declaration (BACKEND; float32_reference.py registers the
same layout with reference.py's kernels).
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from ..block_manager import SCRATCH_BLOCK
from ..integers import bucket, ceil_div
from ..memory import GRAPH_PASS_TOKENS  # the plan books the graphs' pool for passes this large
from ..pass_inputs import DeviceInputs, InputUploader, flat_tokens
from ..sequence import Work
from .core import PAD_ABOVE, PAD_MULTIPLE, Backend, as_words, per_pass
from .reference import reference_attention

# Graphs under the varlen layout: buckets of tokens (the padding costs GEMM rows). A pass of up to
# ~1k tokens takes about as long to launch eagerly as to run, and its launches compete with the
# host's other work.
GRAPH_TOKENS = (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640, 768, GRAPH_PASS_TOKENS)


@dataclass(frozen=True)
class AttentionKernels:
    """The kernels the varlen layout calls, chosen once per runner (`available`; tests give float32
    references)."""

    # out [T, H, D] from q [T, H, D], k/v [Tk, Hkv, D]; None: the padded layout only
    varlen: Callable | None = None
    # writes the rows of its sequences of out (packed.py); None: FlashAttention
    packed: Callable | None = None
    # the most new tokens of a sequence the packed kernel takes in an eager pass
    packed_queries: int = 0


@dataclass
class Varlen:
    """What the attention layers read of one varlen pass."""

    kernels: AttentionKernels
    # [B + 1] int32: sequence b's queries are flat tokens cu_q[b]:cu_q[b + 1]
    cu_q: torch.Tensor = per_pass()
    # [B + 1] int32: its keys are gathered rows cu_k[b]:cu_k[b + 1]
    cu_k: torch.Tensor = per_pass()
    # [cu_k[-1]] row of the flat cache holding each gathered key
    key_slots: torch.Tensor = per_pass()
    max_q: int = 0  # bounds over the sequences FlashAttention takes
    max_k: int = 0
    # FlashAttention takes sequences [0, long_seqs) (their queries are the first long_tokens rows,
    # their keys the first long_keys gathered rows), the packed kernel the next packed_seqs, reading
    # its keys in the cache through key_slots: the layout puts sequences with few new tokens last.
    long_seqs: int = 0
    long_tokens: int = 0
    long_keys: int = 0
    packed_seqs: int = 0

    def prepare(self, dtype: torch.dtype) -> None:
        """Nothing to build once a pass: the kernels take the lengths as they are."""

    def attend(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
        """q [T, H, D]; the caches as flat rows [slots, Hkv, D], this pass's K/V already written.
        Returns [T, H * D]."""
        tokens, heads, dim = q.shape
        kv_heads = k_rows.shape[1]

        def gathered(rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
            return (
                as_words(rows.view(rows.shape[0], -1))[slots].view(q.dtype).view(-1, kv_heads, dim)
            )

        if not self.packed_seqs:
            keys, values = gathered(k_rows, self.key_slots), gathered(v_rows, self.key_slots)
            out = self.kernels.varlen(
                q, keys, values, self.cu_q, self.cu_k, self.max_q, self.max_k, dim**-0.5
            )
            return out.reshape(tokens, heads * dim)
        out = q.new_empty(q.shape)
        if self.long_seqs:
            n, slots = self.long_seqs + 1, self.key_slots[: self.long_keys]
            out[: self.long_tokens] = self.kernels.varlen(
                q[: self.long_tokens],
                gathered(k_rows, slots),
                gathered(v_rows, slots),
                self.cu_q[:n],
                self.cu_k[:n],
                self.max_q,
                self.max_k,
                dim**-0.5,
            )
        self.kernels.packed(
            q,
            k_rows,
            v_rows,
            out,
            self.cu_q,
            self.cu_k,
            self.key_slots,
            self.long_seqs,
            self.packed_seqs,
            dim**-0.5,
        )
        return out.view(tokens, heads * dim)


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    # The private op behind torch's own varlen and nested-tensor attention; these arguments mean the
    # same from torch 2.3 on (later versions only add keyword arguments). is_causal aligns the mask
    # bottom-right.
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale
    )[0]


@lru_cache
def varlen_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the varlen kernel runs here and agrees with the reference on a small case with a
    cached prefix (asked once per device and dtype)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    g = torch.Generator(device=device).manual_seed(0)
    # Two sequences: 3 new tokens after a 2-token prefix, and 2 new tokens from position 0; 4 query
    # heads, 2 KV.
    q = torch.randn(5, 4, 128, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(7, 2, 128, device=device, dtype=dtype, generator=g) for _ in range(2))
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 5, 7], dtype=torch.int32, device=device)
    try:
        out = _flash_varlen(q, k, v, cu_q, cu_k, 3, 5, 128**-0.5)
    except (RuntimeError, NotImplementedError):  # built without FlashAttention, or not for this GPU
        return False
    expected = torch.cat(
        [reference_attention(q[:3], k[:5], v[:5]), reference_attention(q[3:], k[5:], v[5:])]
    )
    return bool(torch.allclose(out.float(), expected, atol=2e-2, rtol=2e-2))


def available(
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    dim: int,
    packed_queries: int,
) -> AttentionKernels | None:
    """FlashAttention's kernel, and the packed one for sequences with at most packed_queries new
    tokens (0: none), where they run here and pass their checks; None where FlashAttention's does
    not."""
    if not varlen_supported(device, dtype):
        return None
    # imports Triton: only where the varlen layout runs (~0.1 GiB of host memory)
    from . import packed

    if packed_queries > 0 and packed.supported(device, dtype, heads, kv_heads, dim):
        return AttentionKernels(_flash_varlen, packed.packed_attention, packed_queries)
    return AttentionKernels(_flash_varlen)


class VarlenLayout:
    """How a pass is laid out for the varlen kernels, and its graphs' shapes: (tokens, gathered
    keys) buckets, for any small pass. `pad_above`, `pad_multiple`: an eager pass of more than
    pad_above tokens is padded to a multiple of pad_multiple tokens and sampled rows."""

    def __init__(
        self,
        kernels: AttentionKernels,
        uploader: InputUploader,
        sliding_window: int | None,
        max_positions: int,
        pad_above: int = PAD_ABOVE,
        pad_multiple: int = PAD_MULTIPLE,
    ):
        self.kernels, self.uploader = kernels, uploader
        self.sliding_window, self.max_positions = sliding_window, max_positions
        self.pad_above, self.pad_multiple = pad_above, pad_multiple
        self.packed = kernels.packed is not None
        self.name = "varlen layout" + (" + packed kernel" if self.packed else "")

    def takes(self, ends: list[int]) -> bool:
        """Whether a pass whose sequences end at `ends` can take this layout (its keys must stay
        inside the sliding window, which the kernel is not given)."""
        return self.sliding_window is None or max(ends) <= self.sliding_window

    def _long(self, work: Work) -> bool:
        """A sequence whose new tokens FlashAttention takes in an eager pass (with the packed
        kernel)."""
        return len(work.tokens) > self.kernels.packed_queries

    def graph_dims(
        self, max_tokens: int, max_seqs: int, max_gather_tokens: int
    ) -> tuple[list[int], list[int]]:
        """Tokens buckets, and gathered keys buckets up to the plan's bound (a decode pass of 500
        sequences holds ~170k keys, and past the largest graph it ran eagerly, 56 against 34 ms a
        pass on an H200)."""
        return (
            [t for t in GRAPH_TOKENS if t <= max_tokens],
            [1024 << i for i in range((max_gather_tokens // 1024).bit_length())],
        )

    def capturable(self, size: int, extent: int, max_gather_tokens: int) -> bool:
        return extent <= max_gather_tokens and extent >= size

    def share_capture_buffers(self, layout: Varlen, extent: int, shared: dict) -> None:
        """The graphs of one extent share its key-slot buffer (replays run one after another on one
        stream, each refreshing it first): one per graph would hold 14 sizes x the extents' sum, 0.2
        GiB at a 1M-key bound."""
        layout.key_slots = shared.setdefault(extent, layout.key_slots)

    def graph_shape(
        self, works: list[Work], dims: tuple[list[int], list[int]]
    ) -> tuple[int, int] | None:
        """The (tokens, keys) bucket this pass fits, if a graph can run it."""
        sizes, extents = dims
        tokens = sum(len(w.tokens) for w in works)
        ends = [w.start + len(w.tokens) for w in works]
        # A graph's kernel bound on one sequence's keys is max_position_embeddings: a longer
        # sequence runs eagerly.
        if tokens > sizes[-1] or not self.takes(ends) or max(ends) > self.max_positions:
            return None
        # A graph gives every sequence to the packed kernel, which is slow on a long prompt chunk:
        # eager then.
        if self.packed and any(self._long(w) for w in works):
            return None
        padded_tokens = bucket(tokens, sizes)
        return padded_tokens, bucket(sum(ends) + padded_tokens - tokens, extents)

    def build(
        self, works: list[Work], shape: tuple[int, int] | None, feed: torch.Tensor | None
    ) -> tuple[DeviceInputs, Varlen]:
        """With the packed kernel, an eager pass lays out its long prompt chunks first
        (FlashAttention takes them) and the sequences with few new tokens after them; a graph's pass
        gives every sequence to the packed kernel. Padding: to `shape` = (tokens, keys) with
        one-token sequences, then empty ones (the kernels' bounds become the graph's); an eager pass
        of more than pad_above tokens with one-token sequences to a multiple of pad_multiple tokens,
        and row 0 sampled again."""
        n = len(works)
        order = list(range(n))
        if self.packed and shape is None:
            order.sort(key=lambda i: not self._long(works[i]))
        ids, sample_rows = flat_tokens(works, order)
        starts = [works[i].start for i in order]
        lens = [len(works[i].tokens) for i in order]
        if shape is None:
            if len(ids) > self.pad_above:
                lens += [1] * (-len(ids) % self.pad_multiple)
                sample_rows += [0] * (-len(sample_rows) % self.pad_multiple)
        else:
            lens += [1] * (shape[0] - len(ids)) + [0] * (len(ids) - n)
            sample_rows += [0] * (shape[0] - len(sample_rows))
        starts += [0] * (len(lens) - n)
        ids += [0] * (sum(lens) - len(ids))
        ends = [s + k for s, k in zip(starts, lens)]
        nblocks = ceil_div(max(ends), self.uploader.block_size)
        t = self.uploader.upload(works, order, ids, sample_rows, starts, lens, nblocks, feed=feed)
        return t, self._layout(works, t, lens, ends, shape)

    def _layout(
        self,
        works: list[Work],
        t: DeviceInputs,
        lens: list[int],
        ends: list[int],
        shape: tuple[int, int] | None,
    ) -> Varlen:
        """Each sequence's keys as one run of cache slots (key_slots): FlashAttention's sequences
        have theirs gathered, the packed kernel reads them in place."""
        bs, device = self.uploader.block_size, t.starts.device
        ends_t = t.starts + t.lens
        cu_k = torch.zeros(len(lens) + 1, dtype=torch.int64, device=device)
        torch.cumsum(ends_t, 0, out=cu_k[1:])
        key_seq = torch.arange(len(lens), device=device).repeat_interleave(
            ends_t, output_size=sum(ends)
        )
        key_pos = torch.arange(sum(ends), device=device) - cu_k[key_seq]
        key_slots = t.tables[key_seq, key_pos // bs] * bs + key_pos % bs
        keys = shape[1] if shape is not None else sum(ends)
        if keys > sum(ends):  # a graph's padding keys, gathered from the scratch block
            key_slots = torch.cat(
                [key_slots, key_slots.new_full((keys - sum(ends),), SCRATCH_BLOCK * bs)]
            )
        if not self.packed:
            long_seqs = len(lens)
        else:
            long_seqs = sum(map(self._long, works)) if shape is None else 0
        if shape is None:
            max_q, max_k = max(lens[:long_seqs], default=0), max(ends[:long_seqs], default=0)
        else:
            max_q, max_k = shape[0], min(keys, self.max_positions)
        return Varlen(
            kernels=self.kernels,
            cu_q=t.cu_q.int(),
            cu_k=cu_k.int(),
            max_q=max_q,
            max_k=max_k,
            key_slots=key_slots,
            long_seqs=long_seqs,
            long_tokens=sum(lens[:long_seqs]),
            long_keys=sum(ends[:long_seqs]),
            packed_seqs=len(lens) - long_seqs,
        )


def layout(
    kernels: AttentionKernels,
    uploader: InputUploader,
    cfg,
    max_gather_tokens: int,
    pad_above: int,
    pad_multiple: int,
) -> VarlenLayout:
    return VarlenLayout(
        kernels, uploader, cfg.sliding_window, cfg.max_position_embeddings, pad_above, pad_multiple
    )


# The FlashAttention kernels' module, loaded on first use, costs host memory (a third of a GiB:
# BENCHMARKS.md, "The Orin emulation").
BACKEND = Backend(
    "varlen",
    kernels=available,
    layout=layout,
    devices=("cuda",),
    host_bytes=384 * 2**20,
    gathers_whole_pass=True,
    graphs_every_small_pass=True,
)
