"""Speculative drafts never change the output: right, wrong-at-first, wrong-in-the-middle and wrong-at-last drafts
all give exactly what plain greedy decoding gives, and right drafts save forward passes."""

import pytest
from conftest import generator, scheduler

import optimize

from orinfer.speculation import PER_MATCHED, NgramPool, candidate_drafts, lookup_drafts
from orinfer.observe import Observer
from orinfer.options import Options
from orinfer.sequence import Lookups, Sequence

NEW = 24


@pytest.mark.unit
def test_draft_sources():
    seq = Sequence(
        index=0,
        token_ids=[5, 6, 7, 8, 9, 1],
        num_prompt_tokens=5,
        max_new_tokens=9,
        candidates=[[2, 3], [1, 4, 5, 6]],
    )
    assert candidate_drafts(seq, 2) == [4, 5]  # generated [1] starts the second candidate
    seq.token_ids[5:] = [6, 7]  # generated [6, 7] occurred in the prompt, followed by 8 9 ...
    assert lookup_drafts(seq, 3) == [8, 9, 6]
    assert candidate_drafts(seq, 2) == []


@pytest.mark.unit
def test_lookup_takes_the_longest_tail_then_the_pool_within_the_draft_length():
    seq = Sequence(
        index=0, token_ids=[1, 2, 3, 9, 1, 2, 7, 5, 1, 2, 3], num_prompt_tokens=8, max_new_tokens=40
    )
    seq.lookups.length = 8
    # The tail [1 2 3] occurred at the start (followed by 9 ...), [1 2] later (followed by 7): the longest wins.
    assert lookup_drafts(seq, 8) == [9, 1, 2, 7, 5, 1, 2, 3][: min(8, 3 * PER_MATCHED)]
    periodic = Sequence(
        index=5,
        token_ids=[9, 5, 6, 7, 5, 6, 7, 5, 6],
        num_prompt_tokens=2,
        max_new_tokens=40,
        lookups=Lookups(length=8),
    )
    assert lookup_drafts(periodic, 7) == [
        7,
        5,
        6,
        7,
        5,
        6,
        7,
    ]  # one period back: the period goes on
    seq.token_ids.append(4)  # [.. 3 4]: only [4] is new, and nothing before has it
    assert lookup_drafts(seq, 8) == []
    other = Sequence(
        index=1, token_ids=[8, 8, 3, 4, 6, 6, 6, 2, 3, 4], num_prompt_tokens=2, max_new_tokens=40
    )
    pool = NgramPool()
    pool.add(other)
    pool.catch_up()  # another request generated [3 4 6 6 6 2 3 4]
    seq.token_ids[-4:] = [6, 6, 6, 2, 3, 4][
        -4:
    ]  # the tail [6 2 3 4] is in the pool, followed by nothing yet
    assert lookup_drafts(seq, 8, pool) == []
    seq.token_ids[-4:] = [4, 6, 6, 6]  # [4 6 6 6] is in the pool, followed by 2 3 4
    assert lookup_drafts(
        Sequence(index=2, token_ids=[0, 0, 4, 6, 6, 6], num_prompt_tokens=3, max_new_tokens=9),
        8,
        pool,
    ) == [2, 3, 4]
    seq.lookups.length = 2  # the draft length bounds every source
    assert (
        len(
            lookup_drafts(
                Sequence(
                    index=3,
                    token_ids=[0, 0, 4, 6, 6, 6],
                    num_prompt_tokens=3,
                    max_new_tokens=9,
                    lookups=Lookups(length=2),
                ),
                8,
                pool,
            )
        )
        == 2
    )


@pytest.mark.unit
def test_a_lookup_that_finds_nothing_halves_the_draft_length():
    seq = Sequence(
        index=0,
        token_ids=[1, 2, 3, 4, 5],
        num_prompt_tokens=3,
        max_new_tokens=40,
        lookups=Lookups(length=4),
    )
    assert lookup_drafts(seq, 8) == [] and seq.lookups.length == 2  # [5] never occurred before
    assert lookup_drafts(seq, 8) == [] and seq.lookups.length == 1
    assert (
        lookup_drafts(seq, 8) == [] and seq.lookups.length == 0
    )  # no more looking, but a retry now and then
    seq.token_ids += [1, 2]  # [1 2] occurred: 7 generated, no retry due
    assert lookup_drafts(seq, 8) == [] and seq.lookups.length == 0


@pytest.mark.unit
def test_lookups_leave_room_for_the_sequences_in_flight():
    """A pass scheduled while another is in flight is topped up with that one's sequences: its lookups keep a token
    for each of them within the no-cost budget."""

    seqs = [
        Sequence(
            index=i,
            token_ids=[1, 2, 3, 1, 2, 3, 1, 2],
            num_prompt_tokens=8,
            max_new_tokens=40,
            lookups=Lookups(length=8),
        )
        for i in range(3)
    ]
    sch = scheduler(max_num_seqs=4, max_drafts=8, lookup_draft_tokens=4)
    for seq in seqs:
        sch.add(seq)
    sch.postprocess(sch.schedule(), [3, 3, 3])  # the prompts' pass
    sch.in_flight.update(seqs[:2])  # two of them in a pass not yet committed
    works = sch.schedule()
    assert [w.seq for w in works] == [seqs[2]] and works[0].num_drafts == 4 - 1 - 2


@pytest.mark.unit
def test_the_draft_length_doubles_while_drafts_are_right_and_falls_when_not():
    seq = Sequence(index=0, token_ids=[1, 2, 3, 1, 2], num_prompt_tokens=3, max_new_tokens=40)
    sch = scheduler(64, max_num_seqs=4, max_drafts=2, lookup_draft_tokens=64)
    sch.add(seq)
    sch.postprocess(sch.schedule(), [3])  # the prompt's pass: its token is 3
    works = sch.schedule()  # [1 2 3 1 2 3]: what followed [1 2 3], its period going on
    w = works[0]
    assert (
        w.looked_up and w.tokens == [3, 1, 2, 3, 1] and w.num_drafts == 4
    )  # past max_drafts: a small pass
    sch.postprocess(works, [1, 2, 3, 1, 7])  # all four right
    assert seq.lookups.length == 8 and seq.generated[-5:] == [1, 2, 3, 1, 7]
    for _ in range(8):  # until a pass drafts two or more: the first right, then wrong
        works = sch.schedule()
        drafts = works[0].tokens[1:]
        if len(drafts) < 2:
            sch.postprocess(
                works, drafts + [1]
            )  # (1 occurred before: the next lookup finds what followed it)
            continue
        sch.postprocess(works, drafts[:1] + [99] + drafts[2:] + [9])
        break
    assert seq.lookups.length == 2


@pytest.mark.unit
def test_candidates_that_begin_alike_draft_only_what_they_share():
    seq = Sequence(
        index=0,
        token_ids=[5, 1],
        num_prompt_tokens=1,
        max_new_tokens=9,
        candidates=[[1, 4, 5, 6], [3, 3], [1, 4, 5, 7, 8], [1, 4, 5, 6, 2]],
    )
    assert candidate_drafts(seq, 9) == [
        4,
        5,
    ]  # [1] begins three candidates: they share 4 5, then differ
    seq.token_ids += [4, 5, 7]
    assert candidate_drafts(seq, 9) == [8]  # [1 4 5 7] begins one
    seq.token_ids[2:] = [4, 5, 6]
    assert (
        candidate_drafts(seq, 9) == []
    )  # [1 4 5 6] is one candidate whole and begins another: nothing


@pytest.fixture(scope="module")
def plain(tiny_dir, public_chats):
    observer = Observer()
    g = generator(tiny_dir, Options(speculate=False), observer=observer)
    outs = g(public_chats, max_new_tokens=NEW, return_full_text=False)
    return outs, [observer.generated[i] for i in range(len(public_chats))], g.engine.stats["passes"]


def run_with_candidates(tiny_dir, public_chats, make_candidate, lookup=0):
    g = generator(tiny_dir, Options(lookup_draft_tokens=lookup))
    prompts = optimize.prompt_ids(g.tokenizer, public_chats)
    seqs = [
        Sequence(
            index=i,
            token_ids=list(p),
            num_prompt_tokens=len(p),
            max_new_tokens=NEW,
            candidates=make_candidate(i),
        )
        for i, p in enumerate(prompts)
    ]
    g.engine.generate(seqs)
    return [s.generated for s in seqs], g.engine.stats


@pytest.mark.parametrize("wrong_at", [None, "first", "middle", "last"])
def test_drafts_right_or_wrong_give_plain_greedy_output(tiny_dir, public_chats, plain, wrong_at):
    _, greedy, plain_passes = plain

    def candidate(i):
        c = list(greedy[i])
        if len(c) > 2 and wrong_at:
            k = {"first": 1, "middle": len(c) // 2, "last": len(c) - 1}[wrong_at]
            c[k] = (c[k] + 1) % 32000
        return [c]

    tokens, stats = run_with_candidates(tiny_dir, public_chats, candidate)
    assert tokens == greedy
    assert stats["draft_tokens"] > 0
    if wrong_at is None:
        assert stats["accepted_drafts"] == stats["draft_tokens"]
        assert (
            stats["passes"] < plain_passes / 2
        )  # exact drafts: whole answers verified in a few passes
    else:
        assert stats["accepted_drafts"] < stats["draft_tokens"]


def test_prompt_lookup_drafts_keep_output(tiny_dir, public_chats, plain):
    tokens, stats = run_with_candidates(tiny_dir, public_chats, lambda i: [], lookup=64)
    assert tokens == plain[1]
    assert stats["draft_tokens"] > 0


def test_drafts_from_other_requests_outputs_keep_output_and_save_passes(tiny_dir, public_chats):
    # The same prompts twice, one request at a time: each copy runs after its original (requests of one length
    # are taken in input order), so its drafts come from the original's output (the run's n-gram pool).
    chats = public_chats[:8] * 2
    plain = generator(tiny_dir, Options(speculate=False), max_num_seqs=1)
    drafted = generator(tiny_dir, Options(lookup_draft_tokens=64), max_num_seqs=1)
    outs = drafted(chats, max_new_tokens=NEW, return_full_text=False)
    assert outs == plain(chats, max_new_tokens=NEW, return_full_text=False)
    stats = drafted.engine.stats
    # A copy's greedy output is its original's: every pool draft is right, and the copies take fewer passes.
    assert (
        0 < stats["accepted_drafts"] == stats["draft_tokens"]
        and stats["passes"] < plain.engine.stats["passes"]
    )


def test_generator_with_speculation_equals_without(gen, public_chats, plain):
    assert gen(public_chats, max_new_tokens=NEW, return_full_text=False) == plain[0]
