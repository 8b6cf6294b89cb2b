"""The padded layout (every device and dtype, torch >= 2.3, NVIDIA's Jetson wheels included): SDPA
over padded [sequences, queries] grids with an additive mask, the sequences in groups whose gathered
keys fit the memory plan's bound (so a long sequence does not pad every other to its length). The
grouped KV heads are handled by folding each KV head's query heads into the query axis, which needs
no copy of K/V per query head and no `enable_gqa` (torch >= 2.5 only).

This file holds all of it: the per-pass object the attention layers read (Padded, its groups and
their masks), how a pass is laid out in groups and padded to a CUDA graph's shape (PaddedLayout),
the graphs' shape buckets, and the backend's declaration (BACKEND). It runs everywhere, so it is
also the layout a pass takes where another backend's cannot (keys past a sliding window).
"""

from array import array
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..integers import bucket, ceil_div
from ..pass_inputs import DeviceInputs, InputUploader, flat_tokens
from ..sequence import Work
from .core import Backend, as_words, per_pass

# cuDNN's attention (chosen first on Hopper by recent torch) builds an execution plan for every new
# shape, and every pass here has new shapes: tens of milliseconds each, inside the timed run. The
# memory-efficient kernel (and the math one on the CPU) take a mask with no such set-up.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Graphs under the padded layout: plain decode passes, bucketed by sequences and by blocks of the
# longest.
GRAPH_SEQS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
GRAPH_KEYS = (128, 256, 512, 1024, 2048, 4096)


@dataclass
class PaddedGroup:
    """Sequences whose keys are gathered together: rows of the pass's block tables and grid."""

    # [b, nblocks] cache blocks of each of its sequences (padding: the scratch block)
    block_tables: torch.Tensor
    # [b, Qmax] flat token index for each cell of its padded query grid (padding: any)
    query_slots: torch.Tensor
    # [b, Qmax] each cell's row of the group's mask table (build_bias)
    mask_rows: torch.Tensor
    # [tokens] grid row of each of its flat tokens (they are a run of the pass's)
    token_seq: torch.Tensor
    token_query: torch.Tensor  # [tokens] grid column of each
    # additive mask [b, 1, Qmax * G, keys], built once per pass by build_bias
    bias: torch.Tensor | None = None


@dataclass
class Padded:
    """The pass's sequences in groups (the longest first) whose gathered keys, sequences x the
    longest's keys, stay within the plan's bound however many sequences the pass holds; each group's
    tokens follow the previous one's. The groups' tensors are views of the two per-pass ones, which
    a graph's replay refreshes."""

    groups: tuple[PaddedGroup, ...]
    block_size: int
    query_groups: int  # query heads per KV head
    sliding_window: int | None
    block_tables: torch.Tensor = per_pass()  # [B, nblocks] every sequence's cache blocks, in order
    mask_rows: torch.Tensor = per_pass()  # every group's mask rows, flat

    def prepare(self, dtype: torch.dtype) -> None:
        """Each group's mask, once a pass (every layer shares it)."""
        for group in self.groups:
            group.bias = build_bias(
                group, self.block_size, self.query_groups, dtype, self.sliding_window
            )

    def attend(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
        """q [T, H, D]; the caches as flat rows [slots, Hkv, D], this pass's K/V already written.
        Returns [T, H * D]."""
        tokens, heads, dim = q.shape
        kv_heads, groups = k_rows.shape[1], heads // k_rows.shape[1]
        # As words too: torch before 2.8 (the Jetson's 2.3) gathers rows one element a thread step
        # (pytorch#151753 gave x[index] on the first dimension its vectorized gather).
        k_cache, v_cache = (
            cache.view(-1, self.block_size, *cache.shape[1:])
            for cache in map(as_words, (k_rows, v_rows))
        )
        # [Hkv, T, G, W]
        words = as_words(q.reshape(-1, kv_heads, groups, dim)).transpose(0, 1)
        outs = []
        for group in self.groups:
            batch, qmax = group.query_slots.shape
            keys, values = (
                cache[group.block_tables]
                .view(q.dtype)
                .view(batch, -1, kv_heads, dim)
                .transpose(1, 2)
                for cache in (k_cache, v_cache)
            )
            # One gather builds the folded query [b, Hkv, Qmax * G, D] and one gather reads the
            # output back in token order, both as words. (reshape, not view: the layout an index or
            # SDPA returns differs between devices.)
            # [Hkv, b, Qmax, G, W]
            query = words[:, group.query_slots]
            query = query.reshape(kv_heads, batch, qmax * groups, -1).view(q.dtype).transpose(0, 1)
            with sdpa_kernel(_BACKENDS):
                out = F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=group.bias, scale=dim**-0.5
                )
            # the next group's gathers reuse this memory: one group's are live at a time
            del keys, values, query
            # [b, Qmax, Hkv, G, W]
            out = as_words(out.reshape(batch, kv_heads, qmax, groups, dim)).transpose(1, 2)
            outs.append(
                out[group.token_seq, group.token_query].view(q.dtype).reshape(-1, heads * dim)
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def build_bias(
    group: PaddedGroup, block_size: int, groups: int, dtype: torch.dtype, sliding_window: int | None
) -> torch.Tensor:
    """Causal (and sliding-window) mask over a group's gathered keys, shared by all layers of one
    padded pass.

    Key j of a sequence sits at position j because block tables list blocks in order. A query at
    position p sees keys p - window < j <= p, as transformers' sliding-window mask does; padding
    cells see key 0 only, so no row is fully masked (that would give NaN). The mask depends on p - j
    alone, so each row is a slice of one table of 2K - 1 values over p - j (the layout gives each
    cell its row, K - 1 - p): built with fills and one gather, where comparisons and `where` would
    load two more kernel modules (host memory an Orin's plan counts).
    """
    keys = group.block_tables.shape[1] * block_size
    window = keys if sliding_window is None else min(keys, sliding_window)
    table = torch.full(
        (2 * keys - 1,), torch.finfo(dtype).min, dtype=dtype, device=group.mask_rows.device
    )
    table[keys - window : keys] = 0  # entry u is for p - j = K - 1 - u
    rows = group.mask_rows
    rows = rows[:, :, None].expand(-1, -1, groups).reshape(rows.shape[0], -1)
    return table.unfold(0, keys, 1)[rows][:, None]


class PaddedLayout:
    """How a pass is laid out in padded groups, and its graphs' shapes: (sequences, blocks) buckets,
    for passes of plain decode steps. `kernels`: the backend's (none here; paged.PagedLayout's
    kernel). `max_gather_tokens`: the keys one group may gather (the memory plan's bound)."""

    name = "padded SDPA layout"

    def __init__(
        self,
        kernels,
        uploader: InputUploader,
        query_groups: int,
        sliding_window: int | None,
        max_positions: int,
        max_gather_tokens: int,
        pad_above: int = 0,
        pad_multiple: int = 1,
    ):
        self.kernels, self.uploader, self.block_size = kernels, uploader, uploader.block_size
        self.query_groups, self.sliding_window = query_groups, sliding_window
        self.max_positions, self.max_gather_tokens = max_positions, max_gather_tokens
        self.pad_above, self.pad_multiple = pad_above, pad_multiple

    def takes(self, ends: list[int]) -> bool:
        return True

    def graph_dims(
        self, max_tokens: int, max_seqs: int, max_gather_tokens: int
    ) -> tuple[list[int], list[int]]:
        most_blocks = ceil_div(self.max_positions, self.block_size)
        return (
            sorted({b for b in GRAPH_SEQS if b < max_seqs} | {max_seqs}),
            sorted({min(ceil_div(t, self.block_size), most_blocks) for t in GRAPH_KEYS}),
        )

    def capturable(self, size: int, extent: int, max_gather_tokens: int) -> bool:
        return size * extent * self.block_size <= max_gather_tokens

    def share_capture_buffers(self, layout: Padded, extent: int, shared: dict) -> None:
        """Nothing is shared between graphs: each holds its own small mask rows."""

    def graph_shape(
        self, works: list[Work], dims: tuple[list[int], list[int]]
    ) -> tuple[int, int] | None:
        """The (sequences, blocks) bucket of a pass of plain decode steps."""
        if not all(len(w.tokens) == 1 and w.wants_logits for w in works):
            return None
        sizes, extents = dims
        return (
            bucket(len(works), sizes),
            bucket(max(ceil_div(w.start + 1, self.block_size) for w in works), extents),
        )

    def build(
        self, works: list[Work], shape: tuple[int, int] | None, feed: torch.Tensor | None
    ) -> tuple[DeviceInputs, Padded]:
        """The sequences by their count of new tokens, each group's within a factor of two (1, 2,
        3-4, 5-8, ...), then by their keys, the longest first, as many a group as keep its gathered
        keys within max_gather_tokens. A grid pads every sequence to its group's most new tokens
        (one group of decode steps and prompt chunks held 4.4x the pass's tokens in the folded
        queries and again in SDPA's output). Padding: to `shape` = (sequences, blocks) with
        one-token sequences, in one group; an eager pass's keys to whole multiples of 16 (the
        memory-efficient SDPA kernel wants its mask's rows 16-aligned, and otherwise pads a copy of
        the mask in every layer; the extra keys point at the scratch block, masked); an eager pass
        of more than pad_above tokens with one-token sequences in a group of their own to a multiple
        of pad_multiple tokens, and its sampled rows with row 0 sampled again (so that its GEMMs
        take only the counts the warm-up met)."""
        bs, n, align = self.block_size, len(works), max(1, 16 // self.block_size)
        blocks = [ceil_div(ceil_div(w.start + len(w.tokens), bs), align) * align for w in works]
        # the class of its count of new tokens
        queries = [(len(w.tokens) - 1).bit_length() for w in works]
        order = (
            list(range(n))
            if shape is not None
            else sorted(range(n), key=lambda i: (-queries[i], -blocks[i]))
        )
        ids, sample_rows, starts, lens = self._padded(works, order, shape)
        # spans: (first sequence, end, blocks of its longest) of each group; padding sequences in a
        # group of their own
        spans = (
            [(0, len(lens), shape[1])] if shape is not None else self._spans(order, blocks, queries)
        )
        if shape is None and len(lens) > n:
            spans.append((n, len(lens), align))
        query_slots, mask_rows, grids = self._grids(spans, starts, lens)
        nblocks = max(most for _, _, most in spans)
        t = self.uploader.upload(works, order, ids, sample_rows, starts, lens, nblocks,
                                 query_slots + mask_rows, feed)  # fmt: skip
        return t, self._layout(t, spans, grids, len(query_slots))

    def _padded(
        self, works: list[Work], order: list[int], shape: tuple[int, int] | None
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """The pass's ids, rows to sample, and each sequence's start and new tokens, in `order`,
        padded to `shape` with one-token sequences, or an eager pass of more than pad_above tokens
        to a multiple of pad_multiple (its sampled rows with row 0 again)."""
        n = len(works)
        ids, sample_rows = flat_tokens(works, order)
        starts = [works[i].start for i in order]
        lens = [len(works[i].tokens) for i in order]
        if shape is not None:
            lens += [1] * (shape[0] - n)
            sample_rows += range(len(ids), len(ids) + shape[0] - n)
        elif len(ids) > self.pad_above:
            lens += [1] * (-len(ids) % self.pad_multiple)
            sample_rows += [0] * (-len(sample_rows) % self.pad_multiple)
        starts += [0] * (len(lens) - n)
        ids += [0] * (sum(lens) - len(ids))
        return ids, sample_rows, starts, lens

    def _grids(
        self, spans: list[tuple[int, int, int]], starts: list[int], lens: list[int]
    ) -> tuple:
        """Each cell of a group's grid: its flat token (padding: any), and its row of the group's
        mask table (build_bias): keys - 1 - its position, a padding cell taken at position 0 (it
        sees key 0). grids: (first cell, sequences, queries, first token, tokens) of each group."""
        counting = self.uploader.counting(sum(lens))
        query_slots, mask_rows, grids, token = array("q"), array("q"), [], 0
        for first, end, most in spans:
            keys, qmax, tokens = most * self.block_size, max(lens[first:end]), sum(lens[first:end])
            grids.append((len(query_slots), end - first, qmax, token, tokens))
            if qmax == 1:
                query_slots += counting[token : token + end - first]
                mask_rows += array("q", [keys - 1 - s for s in starts[first:end]])
            else:
                at = token
                for s, k in zip(starts[first:end], lens[first:end]):
                    query_slots += counting[at : at + k] + array("q", bytes(8 * (qmax - k)))
                    mask_rows += array("q", range(keys - 1 - s, keys - 1 - s - k, -1))
                    mask_rows += array("q", [keys - 1]) * (qmax - k)
                    at += k
            token += tokens
        return query_slots, mask_rows, grids

    def _layout(self, t: DeviceInputs, spans: list, grids: list, cells: int) -> Padded:
        slots_t, rows_t = t.layout.split([cells, len(t.layout) - cells])
        groups = []
        for (first, end, most), (cell, batch, qmax, token, tokens) in zip(spans, grids):
            token_seq = t.token_seq[token : token + tokens]
            groups.append(
                PaddedGroup(
                    block_tables=t.tables[first:end, :most],
                    query_slots=slots_t[cell : cell + batch * qmax].view(batch, qmax),
                    mask_rows=rows_t[cell : cell + batch * qmax].view(batch, qmax),
                    token_seq=token_seq - first if first else token_seq,
                    token_query=t.token_query[token : token + tokens],
                )
            )
        return Padded(
            groups=tuple(groups),
            block_size=self.block_size,
            query_groups=self.query_groups,
            sliding_window=self.sliding_window,
            block_tables=t.tables,
            mask_rows=rows_t,
        )

    def _spans(
        self, order: list[int], blocks: list[int], queries: list[int]
    ) -> list[tuple[int, int, int]]:
        """The groups over the sequences in `order` (by class of new tokens, then keys, the longest
        first): as many a group as keep its gathered keys within max_gather_tokens, one class of new
        tokens each."""
        spans, first, n = [], 0, len(order)
        while first < n:
            most = blocks[order[first]]
            end = min(n, first + max(1, self.max_gather_tokens // (most * self.block_size)))
            end = next(
                (j for j in range(first + 1, end) if queries[order[j]] != queries[order[first]]),
                end,
            )
            spans.append((first, end, most))
            first = end
        return spans


def layout_of(
    cls, kernels, uploader: InputUploader, cfg, max_gather_tokens: int, pad_above: int,
    pad_multiple: int,
):  # fmt: skip
    """A layout of the padded family (PaddedLayout, paged.PagedLayout) for a model's config: the
    Backend's `layout` once `cls` is given."""
    return cls(
        kernels,
        uploader,
        cfg.num_attention_heads // cfg.num_key_value_heads,
        cfg.sliding_window,
        cfg.max_position_embeddings,
        max_gather_tokens,
        pad_above,
        pad_multiple,
    )


BACKEND = Backend("padded", kernels=lambda *shape: (), layout=partial(layout_of, PaddedLayout))
