"""Who runs in the next forward pass, and what their sampled tokens mean.

Every pass is one flat batch: each admitted sequence contributes the tokens it has not computed yet,
capped by a token budget (a decode step is the case of one token; a long prompt is prefilled in
chunks). Decoding sequences go first so they always advance, then unfinished prefills, then new
admissions (shortest prompt first). A sequence that decodes may add draft tokens (speculation.py,
which also decides which are kept: those equal to the greedy argmax, so the output is exactly that
of one-token-at-a-time greedy decoding). A sequence in a pass that was launched and not yet
committed is in flight: no pass takes it (nor preempts it) until its tokens are back, except its
next decode step chained to that pass (`chain`), which is fed the token on the device.

Follows nano-vllm's scheduler (https://github.com/GeeeekExplorer/nano-vllm, MIT:
nanovllm/engine/scheduler.py) in its split of duties; chunked prefill as in Sarathi; chained decode
steps as in SGLang's overlap scheduler.
"""

from collections import Counter, deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .integers import ceil_div
from .sequence import Sequence, Work
from .speculation import Speculator


@dataclass
class Limits:
    max_num_seqs: int  # sequences holding cache blocks at once
    max_batched_tokens: int  # tokens in one pass (prefill chunks + decode + drafts)
    # Sequences x longest context in one pass: bounds the varlen layout's gathered K/V (None: the
    # padded layout, which gathers in groups within the bound itself).
    max_gather_tokens: int | None
    max_drafts: int = 0  # draft tokens per sequence and pass (0: no speculation)
    # pass size below which speculative prompt-lookup drafts cost ~nothing
    lookup_draft_tokens: int = 0
    own_drafts: bool = True  # lookups in the sequence's own prompt and output
    pool_drafts: bool = True  # lookups in the run's other answers (NgramPool)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, limits: Limits, eos_ids: list[int], stats: Counter | None = None
    ):
        """`stats`: the counters this scheduler adds to (preemptions, draft tokens proposed and
        accepted): the engine's one stats object."""
        if limits.max_batched_tokens < limits.max_num_seqs:
            raise ValueError(
                "max_batched_tokens must be >= max_num_seqs so every decoding sequence fits a pass"
            )
        self.blocks, self.limits, self.eos = blocks, limits, set(eos_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        # Sequences in a pass that was launched and not yet committed (counted: a chained step makes
        # two): the engine schedules the next pass while the device runs one, and such a sequence's
        # next tokens are not known yet (nor may its blocks be touched).
        self.in_flight: Counter[Sequence] = Counter()
        # Finished sequences whose blocks are not given back yet (release_finished).
        self.unreleased: list[Sequence] = []
        self.stats = stats if stats is not None else Counter()
        self.speculator = Speculator(limits, self.stats)
        # Requests given up on (seq.error says why), until the engine reports them.
        self.failed: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if self.blocks.blocks_needed(seq, seq.num_tokens + 1) > len(self.blocks.refs) - 1:
            self._fail(
                seq,
                f"its {seq.num_tokens} prompt tokens do not fit the KV cache "
                f"({self.blocks.capacity} tokens at this memory budget); raise the memory budget",
            )
            return
        self.blocks.hash_prompt(seq)
        self.waiting.append(seq)
        self.speculator.follow(seq)

    def add_all(self, seqs: list[Sequence]) -> None:
        """Queue requests shortest prompt first: short ones finish and free their places soonest."""
        for seq in sorted(seqs, key=lambda s: s.num_tokens):
            self.add(seq)

    def take_failed(self) -> list[Sequence]:
        """The requests given up on since the last call (each with seq.error), handed over once."""
        failed, self.failed = self.failed, []
        return failed

    def _fail(self, seq: Sequence, why: str) -> None:
        """Give up on one request (it holds no blocks and is in no queue any more); the others go
        on."""
        seq.error, seq.finished = why, True
        self.failed.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _requeue(self, seq: Sequence) -> None:
        """Free a sequence's blocks; it is recomputed later from its tokens so far (prompt +
        generated)."""
        self.running.remove(seq)
        self.blocks.release(seq)
        self.waiting.appendleft(seq)

    def release_finished(self) -> bool:
        """Give back the blocks of the sequences finished since the last call; whether there were
        any. The engine calls it once the next pass is launched (W1's 500 answers hold ~45k
        one-token blocks: milliseconds of host time that would otherwise delay that launch), and
        schedule() as soon as it is short of blocks."""
        done, self.unreleased = self.unreleased, []
        for seq in done:
            self.blocks.release(seq)
        return bool(done)

    def _preempt(self, seq: Sequence) -> None:
        self._requeue(seq)
        self.stats["preemptions"] += 1

    def _expected_growth(self, seq: Sequence) -> int:
        """Blocks a running sequence is expected to add before it ends: as many tokens again as it
        has generated (at least one, at most what max_new_tokens leaves). Admission keeps them free,
        so a sequence that turns out long books more room as it goes, and new ones wait instead of
        being admitted only to be evicted again (each eviction recomputes a whole prompt)."""
        tokens = min(seq.max_new_tokens - seq.num_generated, max(1, seq.num_generated))
        return ceil_div(tokens, self.blocks.block_size)

    def schedule(self, joining: list[Work] | None = None) -> list[Work]:
        """The works of the next pass, in four steps: decode steps (with a listed choice's drafts),
        lookup drafts where the pass has room for them, unfinished prefills, then admissions.
        `joining`: works already scheduled for that same pass (the engine tops up a pass it held
        back); the new ones share its budgets."""
        joining = joining or []
        works = self._decode_steps()
        self._add_lookup_drafts(works, joining)
        budget = self.limits.max_batched_tokens - sum(len(w.tokens) for w in joining + works)
        longest = max((w.start + len(w.tokens) for w in joining + works), default=0)
        chunks, budget, longest = self._prefill_chunks(budget, longest)
        works += chunks + self._admissions(budget, longest)
        self.in_flight.update(w.seq for w in works)
        return works

    def _decode_steps(self) -> list[Work]:
        """Each decoding sequence's next token, with the rest of the listed choice it follows as
        drafts."""
        works = []
        for seq in list(self.running):
            # A running sequence always holds blocks; one preempted earlier in this loop holds none.
            if (
                not seq.block_table
                or seq.num_tokens - seq.num_computed != 1
                or seq in self.in_flight
            ):
                continue
            drafts = self._grow_for_step(seq, self.speculator.choice_drafts(seq))
            if drafts is not None:
                works.append(
                    Work(
                        seq=seq,
                        tokens=seq.token_ids[-1:] + drafts,
                        start=seq.num_tokens - 1,
                        num_drafts=len(drafts),
                        wants_logits=True,
                        decode=True,
                    )
                )
        return works

    def _grow_for_step(self, seq: Sequence, drafts: list[int]) -> list[int] | None:
        """Blocks for a decode step and its drafts: where the cache is short, the drafts go first,
        then the newest sequences not in flight are preempted. The drafts kept, or None when the
        step does not run in this pass (preempted itself, given up on, or waiting for blocks that a
        pass in flight holds)."""
        while not self.blocks.grow(seq, seq.num_tokens + len(drafts)):
            if self.release_finished():
                continue
            if drafts:
                drafts = []
                continue
            if self.running == [seq]:
                self.running.remove(seq)
                self.blocks.release(seq)
                self._fail(
                    seq,
                    f"after {seq.num_generated} new tokens its {seq.num_tokens} tokens no longer "
                    f"fit the KV cache ({self.blocks.capacity} tokens at this memory budget); "
                    "raise the memory budget or lower max_new_tokens",
                )
                return None
            victim = next((s for s in reversed(self.running) if s not in self.in_flight), None)
            # the others are in flight: wait until their pass commits and frees blocks
            if victim is None:
                return None
            self._preempt(victim)
            if victim is seq:
                return None
        return drafts

    def _add_lookup_drafts(self, works: list[Work], joining: list[Work]) -> None:
        """Lookup drafts for the decode steps without drafts, while the pass stays memory-bound:
        they are often wrong, but the tokens up to lookup_draft_tokens ride along at no cost. A
        small batch may then draft far more than max_drafts each, within the sampled rows the plan
        sized the LM head's output for. A pass scheduled while another is in flight is topped up
        with that one's sequences once it commits: a token each is kept for them (those in flight
        besides the joining works)."""
        lim = self.limits
        tokens = sum(len(w.tokens) for w in joining + works)
        ahead = len(self.in_flight) - len(joining)
        spare = min(lim.max_batched_tokens - tokens, lim.lookup_draft_tokens - tokens - ahead)
        rows = lim.max_num_seqs * (1 + lim.max_drafts) - sum(
            w.sampled_rows for w in joining + works
        )
        self.speculator.add_lookup_drafts(works, spare, rows, self.blocks.grow)

    def _prefill_chunks(self, budget: int, longest: int) -> tuple[list[Work], int, int]:
        """The next chunk of each running sequence whose prompt is not all computed, within the
        token budget."""
        works = []
        for seq in [
            s for s in self.running if s.num_tokens - s.num_computed > 1 and s not in self.in_flight
        ]:
            if budget <= 0:
                break
            works.append(self._chunk(seq, budget, admitted=False))
            budget -= len(works[-1].tokens)
            longest = max(longest, seq.num_tokens)
        return works, budget, longest

    def _admissions(self, budget: int, longest: int) -> list[Work]:
        """Waiting requests, shortest first, while the token budget, the cache (keeping each running
        sequence's expected growth free) and the gather bound allow; each admitted with its cached
        prefix reused."""
        lim, works = self.limits, []
        booked = sum(map(self._expected_growth, self.running)) if self.waiting else 0
        while self.waiting and budget > 0 and len(self.running) < lim.max_num_seqs:
            seq = self.waiting[0]
            longest_after = max(longest, seq.num_tokens)
            if (
                lim.max_gather_tokens is not None
                and self.running
                and (len(self.running) + 1) * longest_after > lim.max_gather_tokens
            ):
                break
            need = self.blocks.blocks_needed(seq, seq.num_tokens)
            growth = self._expected_growth(seq)
            if need > self.blocks.num_free or (
                self.running and need + booked + growth > self.blocks.num_free
            ):
                if self.release_finished():
                    continue
                break
            booked += growth
            self.waiting.popleft()
            self.blocks.reuse_prefix(seq)
            self.blocks.grow(seq, seq.num_tokens)
            self.running.append(seq)
            works.append(self._chunk(seq, budget, admitted=True))
            budget -= len(works[-1].tokens)
            longest = longest_after
        return works

    def chain(self, works: list[Work]) -> list[Work]:
        """The next decode step of each sequence of a pass still in flight (`works`), fed the token
        that pass samples for it on the device (Work.fed_row), so that the next pass can launch
        before this one is committed. [] unless every work is a decode step without drafts, none of
        them would draft next (no listed choice is still being followed, and lookups have no room in
        a pass of this many tokens or no sequence would look up, a retry waiting for room for a
        token a sequence) and the cache has room: then the engine commits first, as it would without
        chaining. A sequence that ends at that pass for sure (max_new_tokens) is left out; one that
        ends there with an end-of-turn token is fed nonetheless, and its step is dropped when
        committed."""
        if any(not (w.decode and w.wants_logits) or w.num_drafts for w in works):
            return []
        # A sequence finished since (its chained step in `works` is dropped) or ending at that pass
        # has no next step.
        rows = [
            (row, w.seq)
            for row, w in enumerate(works)
            if not w.seq.finished and w.seq.num_generated + 2 <= w.seq.max_new_tokens
        ]
        seqs = [seq for _, seq in rows]
        if self.speculator.may_draft_next(seqs, self._pacing(seqs), len(rows)):
            return []
        if not all(self.blocks.grow(seq, seq.num_tokens + 1) for _, seq in rows):
            # the blocks grown stay with their sequences: their next step needs them anyway
            return []
        self.in_flight.update(seq for _, seq in rows)
        return [
            Work(
                seq=seq,
                tokens=[0],
                start=seq.num_tokens,
                wants_logits=True,
                decode=True,
                fed_row=row,
            )
            for row, seq in rows
        ]

    def _pacing(self, seqs) -> list[Sequence]:
        """The sequences whose drafts can shorten the run. While requests wait, every one: a
        sequence that ends sooner frees its place for them. Once nothing waits, the run lasts as
        long as its slowest sequence, so only those with the most tokens still allowed
        (max_new_tokens less generated) count: drafts for the others cost the unchained passes and
        save no pass."""
        seqs = list(seqs)
        if self.waiting or not seqs:
            return seqs
        most = max(s.max_new_tokens - s.num_generated for s in seqs)
        return [s for s in seqs if s.max_new_tokens - s.num_generated == most]

    def _chunk(self, seq: Sequence, budget: int, admitted: bool) -> Work:
        n = min(seq.num_tokens - seq.num_computed, budget)
        work = Work(
            seq=seq,
            tokens=seq.token_ids[seq.num_computed : seq.num_computed + n],
            start=seq.num_computed,
            wants_logits=seq.num_computed + n == seq.num_tokens,
            admitted=admitted,
        )
        # Published now, before the pass: a sequence admitted later in this same pass may read these
        # blocks, which is safe because each layer writes all new K/V before any sequence reads the
        # cache.
        work.published = self.blocks.publish(seq, seq.num_computed + n)
        return work

    def postprocess(self, works: list[Work], sampled: list[int]) -> list[Sequence]:
        """Commit a finished pass. `sampled` holds 1 + num_drafts argmax tokens per sampling work,
        in order."""
        self.in_flight -= Counter(w.seq for w in works)
        self.speculator.committed()
        finished = []
        pos = 0
        for w in works:
            seq = w.seq
            # a chained step of a sequence that ended in the pass before: nothing to commit
            if seq.finished:
                pos += w.sampled_rows
                continue
            if w.fed_row >= 0:
                w.tokens[0] = seq.token_ids[-1]  # what the device was fed
            if not w.wants_logits:
                seq.num_computed += len(w.tokens)
                continue
            out = sampled[pos : pos + w.sampled_rows]
            pos += w.sampled_rows
            accepted = self.speculator.accept(w, out)
            seq.num_computed += len(w.tokens) - w.num_drafts + accepted
            for token in out[: accepted + 1]:
                seq.token_ids.append(token)
                if token in self.eos or seq.num_generated >= seq.max_new_tokens:
                    seq.finished = True
                    break
            if seq.finished:
                # its own lookups are over (the pool still points into its tokens)
                seq.lookups.index.clear()
                self.running.remove(seq)
                self.unreleased.append(seq)
                finished.append(seq)
        return finished

    def rollback(self, works: list[Work]) -> None:
        """Undo a pass that failed (out of memory) before anything was committed, then halve the
        limits (the engine has committed any pass in flight first)."""
        self.in_flight -= Counter(w.seq for w in works)
        for w in works:
            self.blocks.unpublish(w.published)
        for w in reversed([w for w in works if w.admitted]):
            self._requeue(w.seq)
        lim = self.limits
        if len(works) <= 1 and sum(len(w.tokens) for w in works) <= 1:
            # nothing smaller can be tried: this request fails, the others still get their turn
            for w in works:
                (self.running if w.seq in self.running else self.waiting).remove(w.seq)
                self.blocks.release(w.seq)
                self._fail(
                    w.seq,
                    "out of device memory in a pass of one token of this request alone; free "
                    "device memory held by other programs or lower the memory budget",
                )
            return
        lim.max_num_seqs = max(1, lim.max_num_seqs // 2)
        lim.max_batched_tokens = max(lim.max_num_seqs, lim.max_batched_tokens // 2)
        if lim.max_gather_tokens is not None:
            lim.max_gather_tokens = max(1, lim.max_gather_tokens // 2)
        while len(self.running) > lim.max_num_seqs:
            self._preempt(self.running[-1])
