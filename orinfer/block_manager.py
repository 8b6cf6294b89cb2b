"""Owner of the KV cache's fixed-size blocks: who holds which block, and which blocks hold a known
prompt prefix.

A full block of prompt tokens is published under a hash chained over every token before it, so a
later prompt that starts the same way (the competition's shared instruction) reuses those blocks
instead of recomputing them. A block whose last owner leaves keeps its hash while it waits in the
free list (oldest reused first), so a prefix stays reusable until the memory is actually needed.

Follows nano-vllm's block manager (https://github.com/GeeeekExplorer/nano-vllm, MIT:
nanovllm/engine/block_manager.py: reference-counted blocks, prefix blocks published under a chained
hash) and vLLM's automatic prefix caching.
"""

from collections import OrderedDict
from typing import Callable

from .integers import ceil_div
from .sequence import Sequence

# never handed out: padding tokens write here and padded block-table entries point here
SCRATCH_BLOCK = 0


class BlockManager:
    """`hasher` chains a block's hash from the one before it and its tokens (tests give one that
    collides)."""

    def __init__(self, num_blocks: int, block_size: int, hasher: Callable[[tuple], int] = hash):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks")
        self.block_size, self.hasher = block_size, hasher
        self.refs = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))

    @property
    def capacity(self) -> int:
        """Tokens the cache holds in all (the scratch block aside)."""
        return (len(self.refs) - 1) * self.block_size

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self, block: int) -> int:
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1
        return block

    def _take_fresh(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.block_hash[block] is not None:  # its old prefix is overwritten now
            del self.by_hash[self.block_hash[block]]
            self.block_hash[block] = self.block_tokens[block] = None
        self.refs[block] = 1
        return block

    def hash_prompt(self, seq: Sequence) -> None:
        """Hash the full blocks of a queued request's prompt now: the engine queues requests while
        the device runs a pass, so admitting them later (on the critical path between passes) only
        looks the hashes up."""
        self._hashes(seq, seq.num_prompt_tokens // self.block_size)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chained hashes of the sequence's first `num_blocks` full blocks. Each is computed once
        per sequence and kept on it (its tokens only ever grow): admission and publishing both walk
        the prompt's blocks. Plain ints: the cyclic collector never scans them (a tuple per block
        would make 4*10^4 objects for it on W1)."""
        known, bs, ids, hasher = seq.block_hashes, self.block_size, seq.token_ids, self.hasher
        h = known[-1] if known else 0
        for i in range(len(known), num_blocks):
            h = hasher((h, *ids[i * bs : (i + 1) * bs]))
            known.append(h)
        return known[:num_blocks]

    def _tokens(self, seq: Sequence, i: int) -> tuple:
        """The tokens of the sequence's block i: a published block keeps them, so a hash collision
        is never reuse."""
        return tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])

    def reuse_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks of its longest published prefix (leaving >= 1 token
        to compute)."""
        assert not seq.block_table and seq.num_computed == 0
        for i, h in enumerate(self._hashes(seq, (seq.num_tokens - 1) // self.block_size)):
            block = self.by_hash.get(h)
            if block is None or self.block_tokens[block] != self._tokens(seq, i):
                break
            seq.block_table.append(self._take(block))
        seq.num_computed = len(seq.block_table) * self.block_size

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, ceil_div(num_tokens, self.block_size) - len(seq.block_table))

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens in total; False (and nothing taken) if the cache is
        short."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            return False
        seq.block_table.extend(self._take_fresh() for _ in range(need))
        return True

    def publish(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Publish the full prompt blocks among the first `num_tokens` tokens; returns the blocks
        newly published."""
        published = []
        for i, h in enumerate(
            self._hashes(seq, min(num_tokens, seq.num_prompt_tokens) // self.block_size)
        ):
            block = seq.block_table[i]
            if self.block_hash[block] is None and h not in self.by_hash:
                self.block_hash[block], self.block_tokens[block] = h, self._tokens(seq, i)
                self.by_hash[h] = block
                published.append(block)
        return published

    def unpublish(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.block_hash[block] is not None:
                del self.by_hash[self.block_hash[block]]
                self.block_hash[block] = self.block_tokens[block] = None

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
        del seq.block_table[:]
        seq.num_computed = 0
