"""One request's state (its tokens, how many of them have K/V in the cache, the cache blocks it
owns), and its share of one forward pass (Work: what the scheduler hands the runner).

The split into Sequence, BlockManager, Scheduler and ModelRunner follows nano-vllm
(https://github.com/GeeeekExplorer/nano-vllm, MIT: nanovllm/engine/); the code is our own
(docs/REPORT.md, Credits).
"""

from array import array
from dataclasses import dataclass, field


@dataclass
class Lookups:
    """A sequence's lookup drafts (speculation.py): how many to propose next, and the n-gram index
    over its tokens (built on the first lookup, then extended)."""

    length: int = 4
    index: dict = field(default_factory=dict)
    indexed: int = 0  # tokens[:indexed + 1] are in the index


@dataclass(eq=False)  # identity: the scheduler looks sequences up in lists every pass
class Sequence:
    # position in the caller's input; results come back in this order
    index: int
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    max_new_tokens: int
    # likely answers, token ids (drafts only, see speculation.py)
    candidates: list[list[int]] = field(default_factory=list)
    # Generated tokens past this many can begin no candidate (speculation.candidate_drafts asks
    # every pass).
    longest_candidate: int = field(init=False, default=0)
    num_computed: int = 0  # tokens whose K/V are in the cache
    # Machine integers, not a list: a pass's inputs copy every table it reads, at memcpy speed
    # (runner._inputs).
    block_table: array = field(default_factory=lambda: array("q"))
    # chained hash per full block (block_manager.py)
    block_hashes: list[int] = field(default_factory=list)
    finished: bool = False
    # why the engine gave up on this request (it finished without an answer)
    error: str | None = None
    lookups: Lookups = field(default_factory=Lookups)  # its lookup drafts' state (speculation.py)

    def __post_init__(self):
        if not isinstance(self.block_table, array):
            self.block_table = array("q", self.block_table)
        self.longest_candidate = max(map(len, self.candidates), default=0)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:  # without the slice that `generated` makes
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass(kw_only=True)
class Work:
    """One sequence's tokens in one forward pass (what the scheduler hands the runner), built by
    keyword."""

    seq: Sequence
    tokens: list[int]  # fed this pass: a prompt chunk, or the last sampled token plus drafts
    start: int  # position of tokens[0]
    # the last num_drafts of tokens are drafts, kept only where they equal the argmax
    num_drafts: int = 0
    # the chunk reaches the end of the known tokens: its last 1 + num_drafts rows are sampled
    wants_logits: bool
    admitted: bool = False  # the sequence entered the cache in this pass
    # one sampled token (+ drafts) after the prompt, as opposed to a prompt chunk
    decode: bool = False
    # its drafts came from a lookup (their acceptance sets the sequence's draft length)
    looked_up: bool = False
    # A chained step (Scheduler.chain): its one token is row fed_row of the sampled tokens of the
    # pass before, still on the device when this one is launched (tokens holds a placeholder until
    # that pass commits); -1: known here.
    fed_row: int = -1
    published: list[int] = field(default_factory=list)

    @property
    def sampled_rows(self) -> int:
        """Rows of the pass's sampled tokens this work takes: the next token and one per draft, if
        it wants logits."""
        return 1 + self.num_drafts if self.wants_logits else 0
