"""Owner of the device: the KV pool, the input tensors of each pass, and CUDA graphs for plain decode steps.

The pool is allocated once, zero-filled (gathered padding keys must be finite: 0 * NaN would poison SDPA), and never
grown. A pass whose every sequence feeds exactly one token replays a CUDA graph captured for its (batch, blocks)
bucket when one exists; every other pass runs eagerly through the very same model code.
"""
import time

import torch

from .attention import Context
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
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.batch_sizes: list[int] = []
        self.block_counts: list[int] = []
        # Per pass: (tokens, sequences, seconds building inputs on the host, seconds of forward until tokens are back).
        self.pass_log: list[tuple[int, int, float, float]] = []

    def context(self, works: list[Work], batch: int | None = None, nblocks: int | None = None):
        """Flat input ids and the attention Context of one pass (optionally padded to a graph bucket)."""
        bs = self.block_size
        ids, positions, slots, token_seq, token_query, sample_rows = [], [], [], [], [], []
        qmax = max(len(w.tokens) for w in works)
        batch = batch or len(works)
        if nblocks is None:
            # Whole multiples of 16 keys: the memory-efficient SDPA kernel wants its mask's rows 16-aligned and
            # otherwise pads a copy of the mask in every layer. The extra keys point at the scratch block, masked.
            align = max(1, 16 // bs)
            nblocks = -(-max(-(-(w.start + len(w.tokens)) // bs) for w in works) // align) * align
        query_slots = [0] * (batch * qmax)
        query_positions = [-1] * (batch * qmax)
        tables = []
        for b, w in enumerate(works):
            table = w.seq.block_table
            n, first = len(w.tokens), len(ids)
            ids.extend(w.tokens)
            span = range(w.start, w.start + n)
            positions.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            token_seq.extend([b] * n)
            token_query.extend(range(n))
            query_slots[b * qmax:b * qmax + n] = range(first, first + n)
            query_positions[b * qmax:b * qmax + n] = span
            if w.samples:
                sample_rows.extend(range(len(ids) - 1 - w.num_drafts, len(ids)))
            tables.append(table[:nblocks] + [SCRATCH_BLOCK] * (nblocks - min(len(table), nblocks)))
        tables += [[SCRATCH_BLOCK] * nblocks] * (batch - len(works))
        for pad in range(len(works), batch):  # graph padding: one dummy token per row, written to the scratch block
            query_slots[pad * qmax] = len(ids)
            token_seq.append(pad)
            token_query.append(0)
            ids.append(0)
            positions.append(0)
            slots.append(SCRATCH_BLOCK * bs)
        dev = self.device

        def tensor(x):
            return torch.tensor(x, dtype=torch.long, device=dev)

        ctx = Context(positions=tensor(positions), slots=tensor(slots), block_tables=tensor(tables),
                      query_slots=tensor(query_slots).view(batch, qmax),
                      query_positions=tensor(query_positions).view(batch, qmax),
                      token_seq=tensor(token_seq), token_query=tensor(token_query), sample_rows=tensor(sample_rows),
                      sliding_window=self.sliding_window)
        return tensor(ids), ctx

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
            for name in ("positions", "slots", "block_tables", "query_positions"):
                getattr(io["ctx"], name).copy_(getattr(ctx, name))
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
