"""Exact speculative decoding in one place: where draft tokens come from, how many a sequence
proposes, and which are kept (Speculator, which the scheduler asks).

A draft is only a guess: the runner scores it in the same pass as the real next token and
`Speculator.accept` keeps the draft tokens that equal the greedy argmax, so the output is what plain
greedy decoding gives. Two sources, in order:
  1. the answer candidates: multiple-choice prompts list their choices (dataset.parse_choices), and
     the answer is one of them verbatim. If everything generated so far is the start of a candidate,
     propose the rest (the pass that verifies it also samples the token after it: the end-of-turn
     token, if the answer is that choice); of several, what they share.
  2. lookup: if the last few tokens occurred before, in this request's prompt or output (its own
     n-gram index) or in another request's output in this run (NgramPool: the model's own words,
     nothing from outside), propose what followed them there. How many: the sequence's draft length,
     which doubles while its drafts are all accepted, falls to one more than were when some were,
     and halves when none were or none were found (to 0: no drafting, and no host work for it, but a
     retry now and then), within what a longer match allows.
"""

from collections import Counter

from .sequence import Sequence, Work

NGRAM = 4  # the longest tail looked up
PER_MATCHED = 4  # draft tokens a matched tail token allows: a one-token match proposes at most 4
RETRY = 32  # generated tokens between tries of a sequence that stopped drafting
# lookup drafts a sequence may propose in one pass, however well its drafts do
MAX_DRAFT_LENGTH = 64


def _index(seq: Sequence) -> dict[tuple, int]:
    """The sequence's n-gram index (every n <= NGRAM: the position after the latest occurrence),
    brought up to date: built on its first lookup, then extended by the tokens added since."""
    index, tokens = seq.lookups.index, seq.token_ids
    # the tail itself (end == len) is what is looked up
    for end in range(seq.lookups.indexed + 1, len(tokens)):
        for n in range(1, min(NGRAM, end) + 1):
            index[tuple(tokens[end - n : end])] = end
    seq.lookups.indexed = max(seq.lookups.indexed, len(tokens) - 1)
    return index


def _continuation(tokens: list[int], end: int, count: int) -> list[int]:
    """`count` tokens from tokens[end] on; where they run past the last token, the match's period
    repeats (a tail that matched one period back predicts the period again: "a b c a b c a b" drafts
    "c a b c ...", not just "c")."""
    out = tokens[end : end + count]
    period = len(tokens) - end
    while len(out) < count:
        out.append(out[len(out) - period])
    return out


class NgramPool:
    """Continuations of the NGRAM-token n-grams this run's requests have generated, shared by every
    request (answers often repeat an earlier answer's phrasing). Holds positions into the requests'
    token lists, not copies, and indexes them only when a lookup asks after tokens were added (a
    pass that looks nothing up in it, as a large batch's, pays nothing for it)."""

    def __init__(self):
        self.table: dict[tuple, tuple[list[int], int]] = {}
        # each request, and its first position not yet indexed
        self.following: list[tuple[Sequence, int]] = []
        # nothing generated since the last catch_up (the scheduler clears it when it commits)
        self.current = True

    def add(self, seq: Sequence) -> None:
        """Follow this request's generated tokens from now on."""
        self.following.append((seq, seq.num_prompt_tokens + 1))

    def catch_up(self) -> None:
        """Index what the requests generated since the last call (once a pass that looks drafts up):
        the n-grams followed by each one's generated tokens past its first (the n-gram may reach
        back into the prompt: a request that starts its answer alike finds the rest). Finished
        requests are indexed one last time and dropped."""
        following = []
        for seq, start in self.following:
            tokens = seq.token_ids
            for end in range(max(start, NGRAM), len(tokens)):
                self.table[tuple(tokens[end - NGRAM : end])] = (tokens, end)
            if not seq.finished:
                following.append((seq, max(start, len(tokens))))
        self.following = following
        self.current = True

    def get(self, tail: list[int], room: int) -> list[int]:
        if len(tail) < NGRAM:
            return []
        if not self.current:
            self.catch_up()
        found = self.table.get(tuple(tail[-NGRAM:]))
        if found is None:
            return []
        tokens, end = found
        return tokens[end : end + room]


def followed_candidates(seq: Sequence) -> list[list[int]]:
    """The candidates everything generated so far begins (every one, before the first token)."""
    n = seq.num_generated
    if n > seq.longest_candidate:  # past every candidate: no slice made
        return []
    generated = seq.generated
    return [c for c in seq.candidates if len(c) >= n and c[:n] == generated]


def candidate_drafts(seq: Sequence, max_drafts: int) -> list[int]:
    """The rest of the candidate that everything generated so far (at least one token) begins; if
    several do, only the part of their rests they share. Drafting one of them whole wasted its tail
    whenever another was the answer (475 rejected draft tokens on W1); the pass that verifies the
    shared part samples the token that decides."""
    n = seq.num_generated
    if not n or max_drafts <= 0:
        return []
    rests = [c[n:] for c in followed_candidates(seq)]  # a whole one: nothing more
    if not rests:
        return []
    shared = rests[0]
    for rest in rests[1:]:
        same = 0
        while same < min(len(shared), len(rest)) and shared[same] == rest[same]:
            same += 1
        shared = shared[:same]
    return shared[:max_drafts]


def lookup_length(seq: Sequence, generated: int) -> int:
    """The most lookup drafts the sequence proposes once it has generated `generated` tokens: its
    draft length; one whose drafts kept missing stops drafting (its length fell to 0) and tries one
    token again every RETRY generated tokens, in case its text turns repetitive."""
    return seq.lookups.length or (1 if generated % RETRY == 0 else 0)


def lookup_drafts(
    seq: Sequence, max_drafts: int, pool: NgramPool | None = None, own: bool = True
) -> list[int]:
    """What followed the latest earlier occurrence of the longest tail (<= NGRAM tokens): in the
    sequence itself (unless `own` is off), or for a whole NGRAM-token tail in the pool; at most
    max_drafts, its draft length and PER_MATCHED a matched token."""
    room = min(max_drafts, lookup_length(seq, seq.num_generated))
    if room <= 0 or not seq.num_generated:
        return []
    tokens = seq.token_ids
    index = _index(seq) if own else {}
    for n in range(min(NGRAM, len(tokens) - 1), 0, -1):
        end = index.get(tuple(tokens[-n:]))
        if end is not None:
            return _continuation(tokens, end, min(room, PER_MATCHED * n))
        # a whole NGRAM-token match elsewhere beats a shorter one here
        if n == NGRAM and pool is not None:
            found = pool.get(tokens, room)
            if found:
                return found
    # Nothing to propose counts as a miss: a sequence whose text never repeats stops looking (each
    # look costs the host its index's upkeep every pass).
    seq.lookups.length //= 2
    return []


class Speculator:
    """One run's drafting: the pool of its requests' outputs, the drafts each decode step takes, and
    what is kept. `limits`: the scheduler's (scheduler.Limits: max_drafts, lookup_draft_tokens and
    the lookup sources own_drafts and pool_drafts); `stats`: the counters it adds to (draft tokens
    proposed and accepted)."""

    def __init__(self, limits, stats: Counter):
        self.limits, self.stats = limits, stats
        # what this run's requests have generated, for each other's lookup drafts
        self.pool = NgramPool()

    def follow(self, seq: Sequence) -> None:
        self.pool.add(seq)

    def choice_drafts(self, seq: Sequence) -> list[int]:
        """The rest of the listed choice a decode step's sequence follows, within max_drafts and
        max_new_tokens."""
        return candidate_drafts(
            seq, min(self.limits.max_drafts, seq.max_new_tokens - seq.num_generated - 1)
        )

    def add_lookup_drafts(self, works: list[Work], spare: int, rows: int, grow) -> None:
        """Lookup drafts for the decode steps without drafts, within `spare` tokens of the pass and
        `rows` sampled rows; `grow(seq, tokens)` books the cache they need (False: none are added).
        """
        lim = self.limits
        for w in works:
            if spare <= 0 or rows <= 0:
                break
            if w.num_drafts == 0:
                room = min(spare, rows, w.seq.max_new_tokens - w.seq.num_generated - 1)
                drafts = lookup_drafts(
                    w.seq, room, self.pool if lim.pool_drafts else None, own=lim.own_drafts
                )
                if drafts and grow(w.seq, w.seq.num_tokens + len(drafts)):
                    w.tokens += drafts
                    w.num_drafts, w.looked_up = len(drafts), True
                    spare -= len(drafts)
                    rows -= len(drafts)

    def accept(self, work: Work, sampled: list[int]) -> int:
        """How many of the work's drafts equal the argmax tokens sampled after them (kept: the rest
        are dropped), and the sequence's next lookup length: all right, twice as many; some, one
        more than were right; none, half."""
        drafts = work.tokens[len(work.tokens) - work.num_drafts :]
        accepted = 0
        while accepted < work.num_drafts and drafts[accepted] == sampled[accepted]:
            accepted += 1
        self.stats["draft_tokens"] += work.num_drafts
        self.stats["accepted_drafts"] += accepted
        if work.looked_up:
            lookups = work.seq.lookups
            lookups.length = min(
                MAX_DRAFT_LENGTH,
                2 * work.num_drafts
                if accepted == work.num_drafts
                else accepted + 1
                if accepted
                else lookups.length // 2,
            )
        return accepted

    def committed(self) -> None:
        """A pass's tokens were committed: the pool has new n-grams to index when next asked."""
        self.pool.current = False

    def may_draft_next(self, seqs: list[Sequence], paced: list[Sequence], pass_tokens: int) -> bool:
        """Whether a pass of these sequences' next decode steps (`pass_tokens` tokens) could hold
        drafts: one of them still follows a listed choice (one it left, it never rejoins), or one of
        `paced` (those whose drafts can shorten the run: Scheduler._pacing) would look up, where a
        retry (one token, of a sequence whose drafts kept missing) waits for a pass with room for a
        token a sequence."""
        if not self.limits.max_drafts:
            return False
        if any(len(c) > seq.num_generated for seq in seqs for c in followed_candidates(seq)):
            return True
        room = self.limits.lookup_draft_tokens - pass_tokens
        return room > 0 and any(
            seq.lookups.length
            or (room >= pass_tokens and lookup_length(seq, seq.num_generated + 1))
            for seq in paced
        )
