"""Chunked prefill, preemption under a small cache, and out-of-memory split-and-retry leave outputs unchanged."""

import pytest
import torch
from conftest import generator, scheduler

import optimize

NEW = 40


@pytest.fixture(scope="module")
def expected(gen, public_chats, longest_chat):
    return gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False)


def test_long_prompt_prefilled_in_small_chunks(tiny_dir, public_chats, longest_chat, expected):
    g = generator(tiny_dir, max_batched_tokens=48, max_num_seqs=8)
    assert g(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False) == expected
    assert g.engine.stats["passes"] > 868 // 48  # the 868-token prompt really took many passes


def test_small_cache_preempts_and_recomputes(gen, tiny_dir, public_chats):
    # 63 usable blocks of 4 tokens for ~100-token prompts that grow by up to 100: decoding runs out of blocks.
    g = generator(tiny_dir, block_size=4, num_blocks=64, max_num_seqs=32)
    assert g(public_chats, max_new_tokens=100) == gen(public_chats, max_new_tokens=100)
    assert g.engine.stats["preemptions"] > 0


def test_prompt_larger_than_the_cache_fails_alone(tiny_dir, public_chats, longest_chat, gen):
    g = generator(
        tiny_dir, block_size=4, num_blocks=40
    )  # 156 tokens: the 868-token prompt cannot fit
    failed, done = {}, []
    with pytest.raises(optimize.RecordError) as raised:  # never None in place of an output
        g(
            [public_chats[0], longest_chat, public_chats[1]],
            max_new_tokens=4,
            return_full_text=False,
            on_result=lambda i, o: done.append(i),
            on_error=failed.__setitem__,
        )
    assert (
        list(failed) == [1] and "868 prompt tokens do not fit the KV cache (156 tokens" in failed[1]
    )
    outs = raised.value.outputs
    assert sorted(outs) == sorted(done) == [0, 2] and raised.value.failures == failed
    assert [outs[0], outs[2]] == gen(
        [public_chats[0], public_chats[1]], max_new_tokens=4, return_full_text=False
    )
    with pytest.raises(optimize.RecordError, match="input 0: its 868 prompt tokens do not fit"):
        g(
            [longest_chat], max_new_tokens=4
        )  # no on_error: the call raises, after the others finished


def test_sequence_outgrowing_the_whole_cache_fails_alone_and_the_others_finish(
    tiny_dir, public_chats, gen
):
    g = generator(
        tiny_dir, block_size=4, num_blocks=40
    )  # 156 tokens: a ~100-token prompt cannot grow by 100
    failed = {}
    with pytest.raises(optimize.RecordError) as raised:
        g(public_chats, max_new_tokens=100, on_error=failed.__setitem__)
    assert failed and all(
        "no longer fit the KV cache (156 tokens" in why for why in failed.values()
    )
    full, outs = gen(public_chats, max_new_tokens=100), raised.value.outputs
    assert sorted(outs) == [i for i in range(len(full)) if i not in failed]
    assert all(outs[i] == full[i] for i in outs)


# What a failed allocation raises: torch's own error, and on Tegra the caching allocator's NVML assert.
OUT_OF_MEMORY = [
    lambda: torch.cuda.OutOfMemoryError("simulated"),
    lambda: RuntimeError(
        "NVML_SUCCESS == r INTERNAL ASSERT FAILED at "
        '"/opt/pytorch/c10/cuda/CUDACachingAllocator.cpp":830, please report a bug'
    ),
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["OutOfMemoryError", "Tegra NVML assert"])
def test_out_of_memory_splits_the_batch_and_retries(tiny_dir, public_chats, expected, error):
    g = generator(tiny_dir)
    launch = g.engine.runner.launch
    failures = []

    def flaky(works, fed_by=None):  # a pass over more than 200 tokens "runs out of memory"
        if sum(len(w.tokens) for w in works) > 200:
            failures.append(len(works))
            raise error()
        return launch(works, fed_by)

    g.engine.runner.launch = flaky
    finished = []
    outs = g(
        public_chats,
        max_new_tokens=NEW,
        return_full_text=False,
        on_result=lambda i, o: finished.append(i),
    )
    assert failures and g.engine.stats["oom_retries"] == len(failures)
    assert outs == expected[: len(public_chats)]
    assert sorted(finished) == list(range(len(public_chats)))  # nothing lost, nothing run twice


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["OutOfMemoryError", "Tegra NVML assert"])
def test_out_of_memory_on_a_single_token_fails_that_request(tiny_dir, public_chats, error):
    g = generator(tiny_dir)

    def always(works, fed_by=None):
        raise error()

    g.engine.runner.launch = always
    failed = {}
    with pytest.raises(optimize.RecordError) as raised:
        g(public_chats[:2], max_new_tokens=4, on_error=failed.__setitem__)
    assert raised.value.outputs == {}
    assert sorted(failed) == [0, 1] and all(
        "out of device memory" in why for why in failed.values()
    )


def test_any_other_runtime_error_is_not_taken_for_out_of_memory(tiny_dir, public_chats):
    g = generator(tiny_dir)

    def broken(works, fed_by=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    g.engine.runner.launch = broken
    with pytest.raises(RuntimeError, match="illegal memory access"):
        g(public_chats[:2], max_new_tokens=4)


@pytest.mark.unit
def test_finished_sequences_give_their_blocks_back_when_released_or_when_needed():
    from orinfer.sequence import Sequence

    sch = scheduler(13, max_num_seqs=4, max_gather_tokens=1000)  # 12 blocks besides the scratch
    blocks = sch.blocks
    a = Sequence(index=0, token_ids=[5, 6, 7, 8, 9], num_prompt_tokens=5, max_new_tokens=1)
    sch.add(a)
    assert sch.postprocess(sch.schedule(), [3]) == [a]
    assert blocks.num_free == 7 and a.block_table  # finished, its blocks not given back yet
    b = Sequence(index=1, token_ids=list(range(10, 20)), num_prompt_tokens=10, max_new_tokens=1)
    sch.add(b)
    works = (
        sch.schedule()
    )  # b needs 10 blocks: the scheduler gives a's back first, rather than wait or preempt
    assert [w.seq for w in works] == [b] and not a.block_table and sch.stats["preemptions"] == 0
    sch.postprocess(works, [3])
    assert sch.release_finished() and blocks.num_free == 12 and not sch.release_finished()


@pytest.mark.unit
def test_a_pass_is_chained_only_where_its_sequences_would_draft_nothing(monkeypatch):
    """Scheduler.chain: the next decode step of each sequence of the pass in flight, fed that pass's token (its row),
    unless a sequence would draft next (a listed choice still followed; a lookup, where the pass leaves lookups room,
    and for a retry room for a token a sequence) or a work of the pass holds drafts; a sequence that ends at that
    pass by max_new_tokens is left out."""
    from orinfer.sequence import Lookups, Sequence

    def in_flight(lookup_budget=0, draft_length=0, candidates=(), max_new=40):
        seqs = [
            Sequence(
                index=i,
                token_ids=[5 + i, 6, 7, 8],
                num_prompt_tokens=4,
                max_new_tokens=max_new if i == 1 else 40,
                candidates=[list(c) for c in candidates] if i == 1 else [],
                lookups=Lookups(length=draft_length),
            )
            for i in range(3)
        ]
        sch = scheduler(max_num_seqs=4, max_drafts=4, lookup_draft_tokens=lookup_budget)
        for seq in seqs:
            sch.add(seq)
        sch.postprocess(sch.schedule(), [9, 9, 9])  # the prompts' pass: one token generated each
        return sch, seqs, sch.schedule()  # their decode steps, in flight

    sch, seqs, works = in_flight()
    chained = sch.chain(works)
    assert [(w.seq, w.fed_row, w.start, len(w.tokens), w.num_drafts) for w in chained] == [
        (s, i, 5, 1, 0) for i, s in enumerate(seqs)
    ]
    assert all(sch.in_flight[s] == 2 for s in seqs) and all(len(s.block_table) == 6 for s in seqs)
    sch, seqs, works = in_flight(max_new=2)  # the second ends at the pass in flight: left out
    assert [w.seq for w in sch.chain(works)] == [seqs[0], seqs[2]]
    sch, seqs, works = in_flight(
        lookup_budget=8, draft_length=4
    )  # lookups have room and would be made
    assert sch.chain(works) == []
    sch, seqs, works = in_flight(
        lookup_budget=8
    )  # room, but each stopped drafting (no retry due at 2 tokens)
    assert len(sch.chain(works)) == 3
    sch, seqs, works = in_flight(
        lookup_budget=3, draft_length=4
    )  # drafting sequences, no room for lookups
    assert len(sch.chain(works)) == 3
    monkeypatch.setattr(
        "orinfer.speculation.RETRY", 2
    )  # each stopped drafting, and retries at its second token
    sch, seqs, works = in_flight(
        lookup_budget=6
    )  # room for a token a sequence (3 of 3): the retries wait for none
    assert sch.chain(works) == []
    sch, seqs, works = in_flight(
        lookup_budget=5
    )  # room for 2 tokens among 3 sequences: chained, retries later
    assert len(sch.chain(works)) == 3
    monkeypatch.undo()
    sch, seqs, works = in_flight(
        candidates=[[9, 11, 12]]
    )  # the second still follows a listed choice
    assert sch.chain(works) == []
    sch, seqs, works = in_flight(
        candidates=[[8, 11, 12], [9]]
    )  # it left one, and matched the other whole
    assert len(sch.chain(works)) == 3
    sch, seqs, works = in_flight()
    works[0].num_drafts = 1  # a pass holding drafts: its accepted tokens are unknown
    assert sch.chain(works) == []


@pytest.mark.unit
def test_once_nothing_waits_only_the_slowest_sequences_keep_a_pass_from_chaining():
    """Scheduler.chain in the run's tail: the run lasts as long as the sequence with the most tokens still allowed, so
    a drafting sequence with fewer left does not keep the pass from chaining (its drafts would save no pass); while a
    request waits, any drafting sequence does (ending sooner frees a place)."""
    from orinfer.sequence import Lookups, Sequence

    def in_flight(slowest_drafts: bool, waiting: bool):
        # Sequence 0 may run 40 tokens, 1 and 2 only 10; who drafts (lookups.length) is what the case varies.
        seqs = [
            Sequence(
                index=i,
                token_ids=[5 + i, 6, 7, 8],
                num_prompt_tokens=4,
                max_new_tokens=40 if i == 0 else 10,
                lookups=Lookups(length=(4 if slowest_drafts else 0) if i == 0 else 4),
            )
            for i in range(3)
        ]
        sch = scheduler(max_num_seqs=3, max_drafts=4, lookup_draft_tokens=32)
        for seq in seqs:
            sch.add(seq)
        sch.postprocess(sch.schedule(), [9, 9, 9])
        works = sch.schedule()
        assert all(
            w.num_drafts == 0 for w in works
        )  # nothing repeats yet: the lookups found nothing to draft
        for seq in seqs:
            seq.lookups.length = (4 if slowest_drafts else 0) if seq.index == 0 else 4
        if waiting:
            sch.add(Sequence(index=3, token_ids=[1, 2, 3], num_prompt_tokens=3, max_new_tokens=10))
        return sch, works

    sch, works = in_flight(slowest_drafts=False, waiting=False)
    assert (
        len(sch.chain(works)) == 3
    )  # only the 40-token sequence paces the run, and it drafts nothing
    sch, works = in_flight(slowest_drafts=True, waiting=False)
    assert sch.chain(works) == []  # the slowest would draft: the pass waits for its drafts
    sch, works = in_flight(slowest_drafts=False, waiting=True)
    assert sch.chain(works) == []  # a request waits: every sequence's drafts count
