"""Owner of the device: the KV pool, the input tensors of each pass, and CUDA graphs for small passes.

The pool is allocated once, zero-filled (gathered padding keys must be finite: 0 * NaN would poison SDPA), and never
grown. Graphs are captured per shape bucket and replay, with the inputs padded to the bucket: under the varlen layout
any pass of up to 1,024 tokens (its launches would take about as long as its work), under the padded layout a pass
whose every sequence feeds exactly one token. Every other pass runs eagerly through the very same model code.
A pass is launched and collected separately, so the engine can do host work while the device runs it.

Follows nano-vllm's ModelRunner (https://github.com/GeeeekExplorer/nano-vllm, MIT: nanovllm/engine/model_runner.py):
the runner binds each layer's K/V cache, builds one Context a pass, and captures graphs over reversed buckets that
share one memory pool.
"""
import time
from array import array
from itertools import accumulate
from dataclasses import dataclass

import torch

from .attention import AttentionKernels, Context, Padded, PaddedGroup, Varlen
from .block_manager import SCRATCH_BLOCK
from .model import Phi3ForCausalLM
from .sequence import Sequence, Work


# Graphs under the varlen layout: buckets of tokens (the padding costs GEMM rows). A pass of up to ~1k tokens takes
# about as long to launch eagerly as to run, and its launches compete with the host's other work (a 572-token
# pass took 32-55 ms eagerly).
VARLEN_GRAPH_TOKENS = (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024)
# cuBLAS picks a GEMM kernel by the exact token count, and the first use of a kernel in a process stalls the host
# until the device is idle, then for milliseconds more (on the H200: 45-57 ms behind 47 ms of queued work, at 7 of
# 19 new counts even after a warm-up at every 1.25x step; in a competition run the device idled 0.1 s). So an eager
# varlen pass of more than PAD_ABOVE tokens (graphs take the smaller ones, at their own sizes) is padded to a
# multiple of PAD_MULTIPLE tokens and sampled rows, and the warm-up meets every such count.
PAD_ABOVE, PAD_MULTIPLE = VARLEN_GRAPH_TOKENS[-1], 64


@dataclass
class Pending:
    """A launched pass: its sampled tokens (on their way to the host), and its timings for an observer."""
    out: torch.Tensor
    began: torch.cuda.Event | None  # recorded before the pass's first copy (None on the CPU)
    ready: torch.cuda.Event | None  # recorded after the sampled tokens' copy to the host
    t0: float                       # perf_counter() when the launch began
    t1: float                       # ... when its inputs were built
    graph: bool
    pinned: torch.Tensor | None = None  # the host buffer `out` lies in, reused once the tokens are read
    on_device: torch.Tensor | None = None  # the sampled tokens where the pass left them (a chained pass's input)
    t2: float = 0.0                     # set by collect: when the tokens were on the host
    device_span: tuple[float, float] | None = None  # set by collect on CUDA: start and end on the device's clock


@dataclass
class _Inputs:
    """One pass's integers on the device: per sequence, and per token (its sequence, its place there, its
    position and cache slot)."""
    ids: torch.Tensor
    sample_rows: torch.Tensor
    starts: torch.Tensor
    lens: torch.Tensor
    tables: torch.Tensor     # [B, nblocks]
    cu_q: torch.Tensor       # [B + 1] int64
    token_seq: torch.Tensor
    token_query: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    layout: torch.Tensor     # the layout's own integers (_padded_context's)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _bucket(n: int, sizes: list[int]) -> int | None:
    return next((s for s in sizes if s >= n), None)


class ModelRunner:
    """`attention`: the varlen layout's kernels (attention.available); `pad_above` and `pad_multiple`: an eager varlen
    pass of more than pad_above tokens is padded to a multiple of pad_multiple tokens and sampled rows;
    `max_gather_tokens`: the keys the padded layout gathers at once (the memory plan's), its groups' bound."""

    def __init__(self, model: Phi3ForCausalLM, num_blocks: int, block_size: int, attention: AttentionKernels,
                 pad_above: int = PAD_ABOVE, pad_multiple: int = PAD_MULTIPLE, max_gather_tokens: int = 1 << 30):
        cfg = model.cfg
        self.model, self.block_size, self.device = model, block_size, model.device
        self.kv = torch.zeros(cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads,
                              cfg.head_dim, dtype=model.dtype, device=self.device)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv[i, 0], self.kv[i, 1]
        model.block_size = block_size
        self.sliding_window = cfg.sliding_window
        # The varlen layout where its kernel was given; a pass whose keys reach past the sliding window uses the
        # padded one. With the packed kernel too, sequences with few new tokens take it.
        self.attention = attention
        self.varlen, self.packed = attention.varlen is not None, attention.packed is not None
        self.pad_above, self.pad_multiple = pad_above, pad_multiple
        self.max_gather_tokens = max_gather_tokens
        self.max_positions = cfg.max_position_embeddings
        # Pinned host buffers, reused so that a run allocates none (a pinned allocation can stall the host): inputs
        # go up through a staging buffer whose last copy is done (its event), tokens come down into a buffer that
        # no uncollected pass holds.
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self._sampled: list[torch.Tensor] = []
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.graph_dims: tuple[list[int], list[int]] = ([], [])  # the buckets of the two dimensions of a graph's shape
        self._epoch: torch.cuda.Event | None = None  # the device clock's zero (the first launch)
        self._count = array("q", range(1024))

    def _uses_varlen(self, ends: list[int]) -> bool:
        """Whether a pass whose sequences end at `ends` takes the varlen layout (its keys must stay inside the
        sliding window, which that kernel is not given)."""
        return self.varlen and (self.sliding_window is None or max(ends) <= self.sliding_window)

    def _long(self, work: Work) -> bool:
        """A sequence whose new tokens FlashAttention takes in an eager pass (with the packed kernel)."""
        return len(work.tokens) > self.attention.packed_queries

    def _graph_shape(self, works: list[Work]) -> tuple[int, int] | None:
        """The captured graph this pass fits, if any: (tokens, gathered keys) buckets for the varlen layout (any
        small pass), (sequences, blocks) for the padded one (plain decode steps only)."""
        if not self.graphs:
            return None
        sizes, extents = self.graph_dims
        if self.varlen:
            tokens = sum(len(w.tokens) for w in works)
            ends = [w.start + len(w.tokens) for w in works]
            # A graph's kernel bound on one sequence's keys is max_position_embeddings: a longer sequence runs eagerly.
            if tokens > sizes[-1] or not self._uses_varlen(ends) or max(ends) > self.max_positions:
                return None
            # A graph gives every sequence to the packed kernel, which is slow on a long prompt chunk: eager then.
            if self.packed and any(self._long(w) for w in works):
                return None
            padded_tokens = _bucket(tokens, sizes)
            return padded_tokens, _bucket(sum(ends) + padded_tokens - tokens, extents)
        if not all(len(w.tokens) == 1 and w.wants_logits for w in works):
            return None
        return (_bucket(len(works), sizes),
                _bucket(max(_ceil_div(w.start + 1, self.block_size) for w in works), extents))

    def context(self, works: list[Work], shape: tuple[int, int] | None = None, feed: torch.Tensor | None = None):
        """Flat input ids and the attention Context of one pass, optionally padded to a graph's shape; each layout's
        builder owns its padding. `feed`: the sampled tokens of the pass before, on the device, where works' fed_row
        point (chained steps). The host lays out per-sequence facts (start, length, block table) and each
        token's sequence, place, position and cache slot, as machine-integer arrays copied in one upload (array
        slices, no Python int per token where blocks hold one token). Padding tokens sit at position 0 in the
        scratch block."""
        if self._uses_varlen([w.start + len(w.tokens) for w in works]):  # a graph's shape agrees
            return self._varlen_context(works, shape, feed)
        return self._padded_context(works, shape, feed)

    @staticmethod
    def _flat(works: list[Work], order: list[int]) -> tuple[list[int], list[int]]:
        """The works' tokens laid out in `order`, and the rows to sample, in the works' own order."""
        ids, first_row = [], [0] * len(works)
        for i in order:
            first_row[i] = len(ids)
            ids += works[i].tokens
        sample_rows = []
        for i, w in enumerate(works):
            if w.wants_logits:
                end = first_row[i] + len(w.tokens)
                sample_rows += range(end - 1 - w.num_drafts, end)
        return ids, sample_rows

    def _inputs(self, works: list[Work], order: list[int], ids: list[int], sample_rows: list[int],
                starts: list[int], lens: list[int], nblocks: int, layout: array | None = None,
                feed: torch.Tensor | None = None) -> _Inputs:
        """Upload one pass's integers (sequences past the works are padding, at position 0 in the scratch block),
        with the layout's own (`layout`, appended). The host lays out every per-token index (each token's sequence,
        its place there, its position and cache slot) by array slices and concatenation: derived on the device they
        took a scan, repeat_interleave, integer division and remainder, whose kernel modules cost host memory when
        first loaded (~0.1 GiB for the scan alone, H200), too much for an Orin's plan."""
        bs, batch = self.block_size, len(lens)
        counting = self._counting(max((s + n for s, n in zip(starts, lens)), default=0))
        scratch = array("q", [SCRATCH_BLOCK]) * nblocks
        tables = [works[i].seq.block_table for i in order] + [scratch] * (batch - len(works))
        first_tokens = array("q", accumulate(lens, initial=0))  # each sequence's first flat token: cu_q
        host = array("q", ids + sample_rows + starts + lens) + first_tokens
        if len(ids) == batch and max(lens, default=1) == 1:  # one token a sequence (decode): no runs to lay out
            host += counting[:batch]
            host += array("q", bytes(8 * batch))
            host += array("q", starts)
            host += array("q", [t[s // bs] * bs + s % bs for t, s in zip(tables, starts)])
        else:
            for i, n in enumerate(lens):
                host += array("q", [i]) * n
            for n in lens:
                host += counting[:n]
            for s, n in zip(starts, lens):
                host += counting[s:s + n]
            for t, s, n in zip(tables, starts, lens):
                host += t[s:s + n] if bs == 1 else array("q", [t[p // bs] * bs + p % bs for p in range(s, s + n)])
        for t in tables:  # array slices and concatenation: memcpy, not a Python int per block
            host += t[:nblocks]
            host += scratch[:max(0, nblocks - len(t))]
        extra = len(layout) if layout is not None else 0
        if layout is not None:
            host += layout
        fed = []  # (flat row, row of `feed`) of each chained step: its token is filled in on the device
        if feed is not None:
            fed = [(row, works[i].fed_row) for i, row in zip(order, first_tokens) if works[i].fed_row >= 0]
            host += array("q", [row for row, _ in fed] + [src for _, src in fed])
        flat = self._upload(host)
        tokens = len(ids)
        ids_t, sample_t, starts_t, lens_t, cu_q, token_seq, token_query, positions, slots, tables_t, layout_t, fed_t = \
            flat.split([tokens, len(sample_rows), batch, batch, batch + 1, tokens, tokens, tokens, tokens,
                        batch * nblocks, extra, 2 * len(fed)])
        if fed:
            dst, src = fed_t.view(2, -1)
            ids_t[dst] = feed[src]
        if self.model.embedding_on_host:  # the token table's rows are looked up where it lives
            ids_t = torch.frombuffer(host, dtype=torch.int64, count=tokens)
        return _Inputs(ids_t, sample_t, starts_t, lens_t, tables_t.view(batch, nblocks), cu_q, token_seq,
                       token_query, positions, slots, layout_t)

    def _counting(self, n: int) -> array:
        """0, 1, 2, ... as a machine-integer array of at least n entries (kept, and grown when a pass needs more)."""
        if len(self._count) < n:
            self._count = array("q", range(max(n, 2 * len(self._count))))
        return self._count

    def _varlen_context(self, works: list[Work], shape: tuple[int, int] | None, feed: torch.Tensor | None):
        """Flat queries, and each sequence's keys as one run of cache slots (key_slots): FlashAttention's sequences
        have theirs gathered, the packed kernel reads them in place. With the packed kernel, an eager pass lays out
        its long prompt chunks first (FlashAttention takes them) and the sequences with few new tokens after them; a
        graph's pass gives every sequence to the packed kernel. Padding: to `shape` = (tokens, keys) with one-token
        sequences, then empty ones (the kernels' bounds become the graph's); an eager pass of more than pad_above
        tokens with one-token sequences to a multiple of pad_multiple tokens, and row 0 sampled again."""
        bs, n = self.block_size, len(works)
        order = list(range(n))
        if self.packed and shape is None:
            order.sort(key=lambda i: not self._long(works[i]))
        ids, sample_rows = self._flat(works, order)
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
        t = self._inputs(works, order, ids, sample_rows, starts, lens, _ceil_div(max(ends), bs), feed=feed)
        ends_t = t.starts + t.lens
        cu_k = torch.zeros(len(lens) + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(ends_t, 0, out=cu_k[1:])
        key_seq = torch.arange(len(lens), device=self.device).repeat_interleave(ends_t, output_size=sum(ends))
        key_pos = torch.arange(sum(ends), device=self.device) - cu_k[key_seq]
        key_slots = t.tables[key_seq, key_pos // bs] * bs + key_pos % bs
        keys = shape[1] if shape is not None else sum(ends)
        if keys > sum(ends):  # a graph's padding keys, gathered from the scratch block
            key_slots = torch.cat([key_slots, key_slots.new_full((keys - sum(ends),), SCRATCH_BLOCK * bs)])
        if not self.packed:
            long_seqs = len(lens)
        else:
            long_seqs = sum(map(self._long, works)) if shape is None else 0
        if shape is None:
            max_q, max_k = max(lens[:long_seqs], default=0), max(ends[:long_seqs], default=0)
        else:
            max_q, max_k = shape[0], min(keys, self.max_positions)
        layout = Varlen(kernels=self.attention, cu_q=t.cu_q.int(), cu_k=cu_k.int(), max_q=max_q, max_k=max_k,
                        key_slots=key_slots, long_seqs=long_seqs, long_tokens=sum(lens[:long_seqs]),
                        long_keys=sum(ends[:long_seqs]), packed_seqs=len(lens) - long_seqs)
        return t.ids, Context(positions=t.positions, slots=t.slots, block_tables=t.tables, sample_rows=t.sample_rows,
                              layout=layout, sliding_window=self.sliding_window)

    def _padded_context(self, works: list[Work], shape: tuple[int, int] | None, feed: torch.Tensor | None):
        """SDPA over [sequences, queries] grids with a mask, in groups (attention.Padded): the sequences by their count
        of new tokens, each group's within a factor of two (1, 2, 3-4, 5-8, ...), then by their keys, the longest
        first, as many a group as keep its gathered keys within max_gather_tokens. A grid pads every sequence to its
        group's most new tokens: one group of decode steps and prompt chunks held 4.4x the pass's tokens in the
        folded queries and again in SDPA's output, W1's largest activations (bench/NOTES.md run 62). Padding: to
        `shape` = (sequences, blocks) with one-token sequences, in one group; an eager pass's keys to whole multiples
        of 16 (the memory-efficient SDPA kernel wants its mask's rows 16-aligned, and otherwise pads a copy of the
        mask in every layer; the extra keys point at the scratch block, masked)."""
        bs, n, align = self.block_size, len(works), max(1, 16 // self.block_size)
        blocks = [_ceil_div(_ceil_div(w.start + len(w.tokens), bs), align) * align for w in works]
        queries = [(len(w.tokens) - 1).bit_length() for w in works]  # the class of its count of new tokens
        order = list(range(n)) if shape is not None else sorted(range(n), key=lambda i: (-queries[i], -blocks[i]))
        ids, sample_rows = self._flat(works, order)
        starts = [works[i].start for i in order]
        lens = [len(works[i].tokens) for i in order]
        if shape is not None:
            lens += [1] * (shape[0] - n)
            sample_rows += range(len(ids), len(ids) + shape[0] - n)
        starts += [0] * (len(lens) - n)
        ids += [0] * (sum(lens) - len(ids))
        # spans: (first sequence, end, blocks of its longest) of each group
        spans = [(0, len(lens), shape[1])] if shape is not None else self._padded_spans(order, blocks, queries)
        # Each cell of a group's grid: its flat token (padding: any), and its row of the group's mask table
        # (attention.build_bias): keys - 1 - its position, a padding cell taken at position 0 (it sees key 0).
        counting = self._counting(len(ids))
        query_slots, mask_rows, grids, token = array("q"), array("q"), [], 0
        for first, end, most in spans:  # grids: (first cell, sequences, queries, first token, tokens) of each group
            keys, qmax, tokens = most * bs, max(lens[first:end]), sum(lens[first:end])
            grids.append((len(query_slots), end - first, qmax, token, tokens))
            if qmax == 1:
                query_slots += counting[token:token + end - first]
                mask_rows += array("q", [keys - 1 - s for s in starts[first:end]])
            else:
                at = token
                for s, k in zip(starts[first:end], lens[first:end]):
                    query_slots += counting[at:at + k] + array("q", bytes(8 * (qmax - k)))
                    mask_rows += array("q", range(keys - 1 - s, keys - 1 - s - k, -1))
                    mask_rows += array("q", [keys - 1]) * (qmax - k)
                    at += k
            token += tokens
        t = self._inputs(works, order, ids, sample_rows, starts, lens, max(most for _, _, most in spans),
                        query_slots + mask_rows, feed)
        slots_t, rows_t = t.layout.split([len(query_slots), len(mask_rows)])
        groups = []
        for (first, end, most), (cell, batch, qmax, token, tokens) in zip(spans, grids):
            token_seq = t.token_seq[token:token + tokens]
            groups.append(PaddedGroup(block_tables=t.tables[first:end, :most],
                                      query_slots=slots_t[cell:cell + batch * qmax].view(batch, qmax),
                                      mask_rows=rows_t[cell:cell + batch * qmax].view(batch, qmax),
                                      token_seq=token_seq - first if first else token_seq,
                                      token_query=t.token_query[token:token + tokens]))
        return t.ids, Context(positions=t.positions, slots=t.slots, block_tables=t.tables, sample_rows=t.sample_rows,
                              layout=Padded(mask_rows=rows_t, groups=tuple(groups)),
                              sliding_window=self.sliding_window)

    def _padded_spans(self, order: list[int], blocks: list[int], queries: list[int]) -> list[tuple[int, int, int]]:
        """The padded layout's groups over the sequences in `order` (by class of new tokens, then keys, the longest
        first): as many a group as keep its gathered keys within max_gather_tokens, one class of new tokens each."""
        spans, first, n = [], 0, len(order)
        while first < n:
            most = blocks[order[first]]
            end = min(n, first + max(1, self.max_gather_tokens // (most * self.block_size)))
            end = next((j for j in range(first + 1, end) if queries[order[j]] != queries[order[first]]), end)
            spans.append((first, end, most))
            first = end
        return spans

    def _upload(self, host: array) -> torch.Tensor:
        """The pass's integers on the device, sent from pinned memory so the host need not wait for a pass still
        running."""
        values = torch.frombuffer(host, dtype=torch.int64)
        if self.device.type != "cuda":
            return values
        n = len(host)
        free = [i for i, (buf, copied) in enumerate(self._staging) if buf.numel() >= n and copied.query()]
        if not free:
            self._staging.append((_pinned(n), torch.cuda.Event()))
            free = [len(self._staging) - 1]
        buf, copied = self._staging[free[0]]
        buf[:n].copy_(values)
        on_device = buf[:n].to(self.device, non_blocking=True)
        copied.record()
        return on_device

    # What a graph replay must refresh: every input its layout reads that depends on the pass, not only on the shape
    # (the varlen layout reads no block tables: they only served to derive the slots).
    _GRAPH_INPUTS = {Varlen: (("positions", "slots", "sample_rows"), ("cu_q", "cu_k", "key_slots")),
                     Padded: (("positions", "slots", "sample_rows", "block_tables"), ("mask_rows",))}

    @torch.inference_mode()
    def launch(self, works: list[Work], fed_by: "Pending | None" = None) -> "Pending":
        """Start one forward pass. The device runs it while the host goes on, which may launch the next pass before
        collecting this one: nothing here waits for the device, and the sampled tokens are copied out (into pinned
        host memory) in stream order, before a later replay can reuse a graph's output buffer. `fed_by`: the pass
        whose sampled tokens the chained steps among `works` take (Work.fed_row), read on the device in stream
        order, before this pass could overwrite them."""
        t0 = time.perf_counter()
        began = ready = None
        if self.device.type == "cuda":
            if self._epoch is None:
                self._epoch = torch.cuda.Event(enable_timing=True)
                self._epoch.record()
            began, ready = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
        shape = self._graph_shape(works)
        sampled = sum(w.sampled_rows for w in works)  # the rows past these are padding
        graph, io = self.graphs.get(shape, (None, None))
        feed = fed_by.on_device if fed_by is not None else None
        if graph is not None:
            ids, ctx = self.context(works, shape, feed)
            io["ids"].copy_(ids)
            names, layout_names = self._GRAPH_INPUTS[type(ctx.layout)]
            for name in names:
                getattr(io["ctx"], name).copy_(getattr(ctx, name))
            for name in layout_names:
                getattr(io["ctx"].layout, name).copy_(getattr(ctx.layout, name))
            t1 = time.perf_counter()
            graph.replay()
            out = io["out"][:sampled]
        else:
            ids, ctx = self.context(works, feed=feed)
            t1 = time.perf_counter()
            out = self.model(ids, ctx)[:sampled]
        on_device, pinned = out, None
        if ready is not None:
            fits = [i for i, buf in enumerate(self._sampled) if buf.numel() >= len(out)]
            pinned = self._sampled.pop(fits[0]) if fits else _pinned(len(out))
            pinned[:len(out)].copy_(out, non_blocking=True)
            ready.record()
            out = pinned[:len(out)]
        return Pending(out, began, ready, t0, t1, graph is not None, pinned, on_device)

    def collect(self, pending: "Pending") -> list[int]:
        """The greedy tokens of every sampling row of a launched pass, in order (waits for that pass only)."""
        if pending.ready is not None:
            pending.ready.synchronize()
            pending.device_span = (self._epoch.elapsed_time(pending.began) / 1e3,
                                   self._epoch.elapsed_time(pending.ready) / 1e3)
        tokens = pending.out.tolist()
        pending.t2 = time.perf_counter()
        if pending.pinned is not None:
            self._sampled.append(pending.pinned)
        return tokens

    @torch.inference_mode()
    def meet_gemm_kernels(self, max_tokens: int, max_sampled: int) -> None:
        """Run every GEMM of a layer and the LM head once at each token count a pass can bring (pad_above), up to
        `max_tokens` tokens and `max_sampled` sampled rows.

        cuBLAS picks its kernel by the exact token count, and a kernel's first use in a process holds up the host
        launching a pass: without this the first timed call spent 0.88 s inside `linear` against 0.11 s in later
        calls (H200)."""
        m = self.model
        layer = m.model.layers[0]

        def counts(most: int) -> list[int]:
            found = {int(1.25 ** k) for k in range(64) if 1.25 ** k <= most} | {most}
            if self.varlen:  # eager passes above pad_above tokens come padded to a multiple of pad_multiple
                padded = range(self.pad_multiple, most + self.pad_multiple, self.pad_multiple)
                found = {c for c in found if c <= self.pad_above} | set(padded)
            return sorted(found)

        def zeros(n: int, features: int) -> torch.Tensor:
            return torch.zeros(n, features, device=m.device, dtype=m.dtype)

        # Largest first: each count's tensors then fit in blocks the allocator already holds (ascending, every new
        # size took new memory, up to the whole GPU).
        for n in reversed(counts(max_tokens)):
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj):
                linear(zeros(n, linear.in_features))
            layer.mlp(zeros(n, m.cfg.hidden_size))  # its own path: one gate_up product when compiled, two eager
        for n in reversed(counts(max_sampled)):  # the LM head sees sampled rows only
            m.lm_head(zeros(n, m.cfg.hidden_size)).argmax(-1)
        torch.cuda.synchronize()
        # Its many odd-sized blocks would stay cached beside the ones the real passes need: give them back (on a
        # 32 GB Orin's plan they raised the device peak by ~30 MiB).
        torch.cuda.empty_cache()

    @torch.inference_mode()
    def tokens_at_one_token_cost(self, most: int, slack: float = 1.1) -> int:
        """The most tokens (of a few sizes up to `most`) whose pass through one layer's GEMMs takes no longer than one
        token's, within `slack`, timed here: a pass reads every weight once whatever its size, so up to there more
        tokens cost nothing (the device's FLOP-to-byte ratio: ~130 on an Orin, more on an H200)."""
        layer = self.model.model.layers[0]
        linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
        m = self.model

        def elapsed_ms(n: int) -> float:
            xs = [torch.randn(n, linear.in_features, device=m.device, dtype=m.dtype) for linear in linears]
            for linear, x in zip(linears, xs):  # its kernel met, outside the timing
                linear(x)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                for linear, x in zip(linears, xs):
                    linear(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        one = elapsed_ms(1)
        sizes = (16, 32, 64, 96, 128, 192, 256, 384, 512)
        return max([1] + [n for n in sizes if n <= most and elapsed_ms(n) <= slack * one])

    @torch.inference_mode()
    def capture_graphs(self, max_tokens: int, max_seqs: int, max_gather_tokens: int) -> None:
        """Capture a graph for each shape bucket a pass within these bounds can take: (tokens, gathered keys) for the
        varlen layout (any small pass), (sequences, blocks) for the padded one (plain decode steps)."""
        if self.model.embedding_on_host:
            raise ValueError("a graph cannot replay a token table read on the host (the memory plan keeps them apart)")
        if self.varlen:
            sizes = [t for t in VARLEN_GRAPH_TOKENS if t <= max_tokens]
            # Up to the plan's bound: a decode pass of W3's 500 sequences holds ~170k keys, and past the largest
            # graph it ran eagerly, 56 against 34 ms a pass (H200, bench/NOTES.md run 54).
            extents = [1024 << i for i in range((max_gather_tokens // 1024).bit_length())]
        else:
            sizes = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if b < max_seqs}
                           | {max_seqs})
            most_blocks = _ceil_div(self.max_positions, self.block_size)
            extents = sorted({min(_ceil_div(t, self.block_size), most_blocks) for t in (128, 256, 512, 1024, 2048, 4096)})
        self.graph_dims = sorted(sizes), sorted(extents)
        pool = None
        stream = torch.cuda.Stream()  # one side stream: each stream keeps its own cached blocks
        # The graphs of one extent share its key-slot buffer (replays run one after another on one stream, each
        # refreshing it first): one per graph would hold 14 sizes x the extents' sum, 0.2 GiB at a 1M-key bound.
        key_slots: dict[int, torch.Tensor] = {}
        for extent in reversed(self.graph_dims[1]):
            for size in reversed(self.graph_dims[0]):
                gathered = extent if self.varlen else size * extent * self.block_size
                if gathered > max_gather_tokens or (self.varlen and extent < size):
                    continue
                ids, ctx = self.context(_dummy_decode(size), (size, extent))
                if isinstance(ctx.layout, Varlen):
                    ctx.layout.key_slots = key_slots.setdefault(extent, ctx.layout.key_slots)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self.model(ids, ctx)  # warm-up outside the graph (lazy kernel and workspace set-up)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model(ids, ctx)
                pool = graph.pool()
                # The graph reads every ctx tensor by address: all of them must outlive it.
                self.graphs[(size, extent)] = (graph, {"ids": ids, "ctx": ctx, "out": out})
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _pinned(n: int) -> torch.Tensor:
    """A pinned int64 host buffer of >= n elements: a power of two, and at least 2 MiB (a competition run's largest
    pass needs ~0.6 MiB), so that few sizes are ever allocated."""
    return torch.empty(max(1 << 18, 1 << (n - 1).bit_length()), dtype=torch.int64, pin_memory=True)


def _dummy_decode(batch: int) -> list[Work]:
    """Stand-in decode works for capture: one token each at position 0 in the scratch block."""
    seq = Sequence(index=-1, token_ids=[0], num_prompt_tokens=1, max_new_tokens=1, block_table=[SCRATCH_BLOCK])
    return [Work(seq=seq, tokens=[0], start=0, wants_logits=True) for _ in range(batch)]
