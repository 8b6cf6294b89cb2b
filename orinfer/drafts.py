"""Draft tokens taken from the prompt itself, for exact speculative decoding.

A draft is only a guess: the runner scores it in the same pass as the real next token and the scheduler keeps the
draft tokens that equal the greedy argmax, so the output is what plain greedy decoding gives (see scheduler.py).
Two sources, in order:
  1. the answer candidates: multiple-choice prompts list their choices (dataset.parse_choices), and the answer is
     one of them verbatim.
     If everything generated so far is the start of a candidate, propose the rest (the pass that verifies it also
     samples the token after it: the end-of-turn token, if the answer is that choice); of several, what they share.
  2. prompt lookup: if the last few generated tokens occurred before (in the prompt or the output), propose what
     followed them there.
"""
from .sequence import Sequence

def candidate_drafts(seq: Sequence, max_drafts: int) -> list[int]:
    """The rest of the candidate that everything generated so far (at least one token) begins; if several do, only
    the part of their rests they share. Drafting one of them whole wasted its tail whenever another was the answer
    (475 rejected draft tokens on W1); the pass that verifies the shared part samples the token that decides."""
    n = seq.num_generated
    if not n or max_drafts <= 0 or all(len(c) < n for c in seq.candidates):  # past every candidate: no slice made
        return []
    generated = seq.generated
    rests = [c[n:] for c in seq.candidates if len(c) >= n and c[:n] == generated]  # a whole one: nothing more
    if not rests:
        return []
    shared = rests[0]
    for rest in rests[1:]:
        same = 0
        while same < min(len(shared), len(rest)) and shared[same] == rest[same]:
            same += 1
        shared = shared[:same]
    return shared[:max_drafts]


def lookup_drafts(seq: Sequence, max_drafts: int, ngram: int = 3) -> list[int]:
    """What follows the latest earlier occurrence (prompt or output) of the longest generated tail (<= `ngram`)."""
    if max_drafts <= 0:
        return []
    tokens = seq.token_ids
    for size in range(min(ngram, seq.num_generated), 0, -1):
        tail = tokens[-size:]
        for start in range(len(tokens) - size - 1, -1, -1):
            if tokens[start:start + size] == tail:
                return tokens[start + size:start + size + max_drafts]
    return []
