"""Speculative drafts never change the output: right, wrong-at-first, wrong-in-the-middle and wrong-at-last drafts
all give exactly what plain greedy decoding gives, and right drafts save forward passes."""
import pytest
from conftest import generator

import optimize

from orinfer.drafts import candidate_drafts, lookup_drafts
from orinfer.observe import Observer
from orinfer.options import Options
from orinfer.sequence import Sequence

NEW = 24


@pytest.mark.unit
def test_draft_sources():
    seq = Sequence(index=0, token_ids=[5, 6, 7, 8, 9, 1], num_prompt_tokens=5, max_new_tokens=9,
                   candidates=[[2, 3], [1, 4, 5, 6]])
    assert candidate_drafts(seq, 2) == [4, 5]     # generated [1] starts the second candidate
    seq.token_ids[5:] = [6, 7]                     # generated [6, 7] occurred in the prompt, followed by 8 9 ...
    assert lookup_drafts(seq, 3) == [8, 9, 6]
    assert candidate_drafts(seq, 2) == []


@pytest.mark.unit
def test_candidates_that_begin_alike_draft_only_what_they_share():
    seq = Sequence(index=0, token_ids=[5, 1], num_prompt_tokens=1, max_new_tokens=9,
                   candidates=[[1, 4, 5, 6], [3, 3], [1, 4, 5, 7, 8], [1, 4, 5, 6, 2]])
    assert candidate_drafts(seq, 9) == [4, 5]      # [1] begins three candidates: they share 4 5, then differ
    seq.token_ids += [4, 5, 7]
    assert candidate_drafts(seq, 9) == [8]         # [1 4 5 7] begins one
    seq.token_ids[2:] = [4, 5, 6]
    assert candidate_drafts(seq, 9) == []          # [1 4 5 6] is one candidate whole and begins another: nothing


@pytest.fixture(scope="module")
def plain(tiny_dir, public_chats):
    observer = Observer()
    g = generator(tiny_dir, Options(speculate=False), observer=observer)
    outs = g(public_chats, max_new_tokens=NEW, return_full_text=False)
    return outs, [observer.generated[i] for i in range(len(public_chats))], g.engine.stats["passes"]


def run_with_candidates(tiny_dir, public_chats, make_candidate, lookup=0):
    g = generator(tiny_dir, Options(lookup_draft_tokens=lookup))
    prompts = optimize.prompt_ids(g.tokenizer, public_chats)
    seqs = [Sequence(index=i, token_ids=list(p), num_prompt_tokens=len(p), max_new_tokens=NEW,
                     candidates=make_candidate(i)) for i, p in enumerate(prompts)]
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
        assert stats["passes"] < plain_passes / 2  # exact drafts: whole answers verified in a few passes
    else:
        assert stats["accepted_drafts"] < stats["draft_tokens"]


def test_prompt_lookup_drafts_keep_output(tiny_dir, public_chats, plain):
    tokens, stats = run_with_candidates(tiny_dir, public_chats, lambda i: [], lookup=64)
    assert tokens == plain[1]
    assert stats["draft_tokens"] > 0


def test_generator_with_speculation_equals_without(gen, public_chats, plain):
    assert gen(public_chats, max_new_tokens=NEW, return_full_text=False) == plain[0]
