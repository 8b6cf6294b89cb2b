"""Owner of the device: the KV pool, the input tensors of each pass, and CUDA graphs for plain decode steps.

The pool is allocated once, zero-filled (gathered padding keys must be finite: 0 * NaN would poison SDPA), and never
grown. A pass whose every sequence feeds exactly one token replays a CUDA graph captured for its (batch, blocks)
bucket when one exists; every other pass runs eagerly through the very same model code.
"""
import time
from array import array

import torch

from .attention import Context, Padded, Varlen, varlen_supported
from .block_manager import SCRATCH_BLOCK
from .model import Phi3ForCausalLM
from .scheduler import Work
from .sequence import Sequence


def _bucket(n: int, sizes: list[int]) -> int | None:
    return next((s for s in sizes if s >= n), None)


class ModelRunner:
    def __init__(self, model: Phi3ForCausalLM, num_blocks: int, block_size: int):
        cfg = model.cfg
        self.model, self.block_size, self.device = model, block_size, model.device
        self.kv = torch.zeros(cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads,
                              cfg.head_dim, dtype=model.dtype, device=self.device)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv[i, 0], self.kv[i, 1]
        model.block_size = block_size
        self.sliding_window = cfg.sliding_window
        # The varlen layout wherever its kernel runs (attention.py); a pass whose keys reach past the sliding window
        # and every CUDA-graph step use the padded one.
        self.varlen = varlen_supported(self.device, model.dtype)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.batch_sizes: list[int] = []
        self.block_counts: list[int] = []
        # Per pass: (tokens, sequences, seconds building inputs on the host, seconds of forward until tokens are back).
        self.pass_log: list[tuple[int, int, float, float]] = []

    def context(self, works: list[Work], batch: int | None = None, nblocks: int | None = None):
        """Flat input ids and the attention Context of one pass (optionally padded to a graph bucket).

        The host lists per-sequence facts only (start, length, block table); the per-token index tensors are derived
        from them on the device, so a 16k-token pass costs the host one small copy rather than Python loops."""
        bs, n = self.block_size, len(works)
        batch = batch or n
        starts = [w.start for w in works] + [0] * (batch - n)
        lens = [len(w.tokens) for w in works] + [1] * (batch - n)  # graph padding: one dummy token at position 0
        ends = [s + k for s, k in zip(starts, lens)]
        ids, sample_rows = [], []
        for w in works:
            ids += w.tokens
            if w.samples:
                sample_rows += range(len(ids) - 1 - w.num_drafts, len(ids))
        ids += [0] * (batch - n)
        varlen = (self.varlen and nblocks is None
                  and (self.sliding_window is None or max(ends) <= self.sliding_window))
        if nblocks is None:
            nblocks = -(-max(ends) // bs)
            if not varlen:
                # Whole multiples of 16 keys: the memory-efficient SDPA kernel wants its mask's rows 16-aligned and
                # otherwise pads a copy of the mask in every layer. The extra keys point at the scratch block, masked.
                align = max(1, 16 // bs)
                nblocks = -(-nblocks // align) * align
        tables = []
        for w in works:
            table = w.seq.block_table[:nblocks]
            tables += table + [SCRATCH_BLOCK] * (nblocks - len(table))
        tables += [SCRATCH_BLOCK] * (nblocks * (batch - n))
        host = ids + sample_rows + starts + lens + tables
        flat = torch.frombuffer(array("q", host), dtype=torch.int64).to(self.device)
        ids_t, sample_t, starts_t, lens_t, tables_t = flat.split([len(ids), len(sample_rows), batch, batch,
                                                                  batch * nblocks])
        tables_t = tables_t.view(batch, nblocks)
        tokens = len(ids)
        rows = torch.arange(batch, device=self.device)
        cu_q = torch.zeros(batch + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(lens_t, 0, out=cu_q[1:])
        token_seq = rows.repeat_interleave(lens_t, output_size=tokens)
        token_query = torch.arange(tokens, device=self.device) - cu_q[token_seq]
        positions = starts_t[token_seq] + token_query
        slots = tables_t[token_seq, positions // bs] * bs + positions % bs
        if varlen:
            ends_t = starts_t + lens_t
            cu_k = torch.zeros(batch + 1, dtype=torch.int64, device=self.device)
            torch.cumsum(ends_t, 0, out=cu_k[1:])
            key_seq = rows.repeat_interleave(ends_t, output_size=sum(ends))
            key_pos = torch.arange(sum(ends), device=self.device) - cu_k[key_seq]
            layout = Varlen(cu_q=cu_q.int(), cu_k=cu_k.int(), max_q=max(lens), max_k=max(ends),
                            key_slots=tables_t[key_seq, key_pos // bs] * bs + key_pos % bs)
        else:
            column = torch.arange(max(lens), device=self.device)
            valid = column < lens_t[:, None]
            layout = Padded(query_slots=torch.where(valid, cu_q[:-1, None] + column, 0),
                            query_positions=torch.where(valid, starts_t[:, None] + column, -1),
                            token_seq=token_seq, token_query=token_query)
        ctx = Context(positions=positions, slots=slots, block_tables=tables_t, sample_rows=sample_t, layout=layout,
                      sliding_window=self.sliding_window)
        return ids_t, ctx

    @torch.inference_mode()
    def run(self, works: list[Work]) -> list[int]:
        """One forward pass; the greedy tokens of every sampling row, in order."""
        t0 = time.perf_counter()
        graph = None
        if all(len(w.tokens) == 1 and w.samples for w in works):
            key = (_bucket(len(works), self.batch_sizes),
                   _bucket(max(-(-(w.start + 1) // self.block_size) for w in works), self.block_counts))
            graph, io = self.graphs.get(key, (None, None))
        if graph is not None:
            ids, ctx = self.context(works, *key)
            io["ids"].copy_(ids)
            for name in ("positions", "slots", "block_tables"):
                getattr(io["ctx"], name).copy_(getattr(ctx, name))
            io["ctx"].layout.query_positions.copy_(ctx.layout.query_positions)
            t1 = time.perf_counter()
            graph.replay()
            tokens = io["out"][:len(works)].tolist()
        else:
            ids, ctx = self.context(works)
            t1 = time.perf_counter()
            tokens = self.model(ids, ctx).tolist()
        self.pass_log.append((len(ids) if graph is None else len(works), len(works), t1 - t0, time.perf_counter() - t1))
        return tokens

    @torch.inference_mode()
    def capture_graphs(self, batch_sizes: list[int], block_counts: list[int], max_gather_tokens: int) -> None:
        """Capture decode graphs for each (batch, blocks) bucket whose gathered K/V stays within the bound."""
        self.batch_sizes, self.block_counts = sorted(batch_sizes), sorted(block_counts)
        pool = None
        stream = torch.cuda.Stream()  # one side stream: each stream keeps its own cached blocks
        for nblocks in reversed(self.block_counts):
            for batch in reversed(self.batch_sizes):
                if batch * nblocks * self.block_size > max_gather_tokens:
                    continue
                ids, ctx = self.context(_dummy_decode(batch), batch, nblocks)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self.model(ids, ctx)  # warm-up outside the graph (lazy kernel and workspace set-up)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model(ids, ctx)
                pool = graph.pool()
                # The graph reads every ctx tensor by address: all of them must outlive it.
                self.graphs[(batch, nblocks)] = (graph, {"ids": ids, "ctx": ctx, "out": out})
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _dummy_decode(batch: int) -> list[Work]:
    """Stand-in decode works for capture: one token each at position 0 in the scratch block."""
    seq = Sequence(index=-1, token_ids=[0], num_prompt_tokens=1, max_new_tokens=1, block_table=[SCRATCH_BLOCK])
    return [Work(seq, [0], 0, 0, True, False) for _ in range(batch)]
