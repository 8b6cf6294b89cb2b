"""The block manager: prefix reuse by chained hashes, blocks kept until reused, no reuse on a hash collision."""

import pytest

from orinfer.block_manager import BlockManager
from orinfer.sequence import Sequence

pytestmark = pytest.mark.unit


def seq(tokens, index=0):
    return Sequence(
        index=index, token_ids=list(tokens), num_prompt_tokens=len(tokens), max_new_tokens=4
    )


def test_published_prefix_is_reused_and_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(10))
    bm.reuse_prefix(a)
    assert a.num_computed == 0
    assert bm.grow(a, 10) and len(a.block_table) == 3
    assert (
        bm.publish(a, 10) == a.block_table[:2].tolist()
    )  # two full blocks; the partial third is not shared
    b = seq(list(range(8)) + [99, 98])
    bm.reuse_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8  # arrays compare by value
    c = seq(range(8))  # fully cached prompt: the last block is recomputed
    bm.reuse_prefix(c)
    assert c.num_computed == 4
    assert bm.refs[a.block_table[0]] == 3


def test_freed_blocks_keep_their_prefix_until_reused_oldest_first():
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable blocks
    a = seq([1, 2, 3, 4, 5])
    bm.grow(a, 5)
    bm.publish(a, 5)
    shared = a.block_table[:2]
    bm.release(a)
    assert bm.num_free == 3
    b = seq([1, 2, 3, 4, 9])
    bm.reuse_prefix(b)
    assert b.block_table == shared and bm.num_free == 1
    bm.release(b)
    c = seq([7, 7, 7, 7, 7, 7])  # needs all three blocks: the cached ones are evicted
    assert bm.grow(c, 6) and bm.num_free == 0
    d = seq([1, 2, 3, 4, 9])
    bm.reuse_prefix(d)
    assert d.num_computed == 0 and not bm.grow(
        d, 5
    )  # nothing cached, nothing free: refused, nothing taken
    assert not d.block_table


def test_a_hash_collision_never_reuses_other_tokens():
    bm = BlockManager(num_blocks=10, block_size=2, hasher=lambda key: 7)  # every block hashes alike
    a = seq([1, 2, 3, 4, 5])
    bm.grow(a, 5)
    assert (
        bm.publish(a, 5) == a.block_table[:1].tolist()
    )  # the second block's hash is taken (by the first)
    b = seq([9, 9, 3, 4, 5])  # same hash, other tokens: computed, not reused
    bm.reuse_prefix(b)
    assert not b.block_table and b.num_computed == 0
    c = seq([1, 2, 8, 8, 5])  # the first block is really shared
    bm.reuse_prefix(c)
    assert c.block_table == a.block_table[:1] and c.num_computed == 2
