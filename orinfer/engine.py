"""The generation loop: while the device runs pass n, the host schedules pass n+1 and, where it can
fill it without pass n's tokens (other sequences, or pass n's decode steps chained to it: fed their
tokens on the device), launches it before collecting pass n (else it collects first and tops pass
n+1 up), until every request has finished."""

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .attention import FALLBACK, Backend
from .block_manager import BlockManager
from .loader import FileRows
from .memory import MemoryPlan, is_out_of_memory
from .model import CausalLM
from .observe import Observer, PassRecord
from .options import Options
from .runner import ModelRunner, Pending
from .scheduler import Limits, Scheduler
from .sequence import Sequence, Work
from .warmup import meet_gemm_kernels, probe, tokens_at_one_token_cost

# The share of its token budget a pass launched ahead of the one in flight must fill: each pass
# costs a whole read of the weights, so a thin one wastes it (BENCHMARKS.md, "Is what was tuned on
# W1...").
AHEAD_FILL = 0.9
# The engine's counters (Engine.stats), the loop's and the scheduler's.
STATS = ("passes", "preemptions", "oom_retries", "prefill_tokens", "max_batch", "draft_tokens",
         "accepted_drafts", "chained_passes")  # fmt: skip
# Engine.warmup's steps, in the order they run.
WARMUP_STEPS = ("token_table", "gemms", "lookup_budget", "graphs", "probe")


@dataclass(frozen=True)
class Report:
    """What an engine holds and has counted (a copy, read-only): its memory plan, the counters since
    the last reset (passes, drafts, preemptions...), the CUDA graphs captured, the KV pool's and the
    device weights' bytes, the pass size under which lookup drafts ride along, and the attention
    line (Engine.describe)."""

    plan: MemoryPlan
    stats: dict
    graphs: int
    kv_bytes: int
    weight_bytes: int
    lookup_budget: int
    attention: str


class Engine:
    """Assembled by optimize.Setup.load, which resolves the options into the plan (its pass size)
    and the kernels. `options`: how it runs (options.py). `attention`: (backend, its kernels), as
    attention.resolve gives them (default: the padded layout); `runner`: the device's owner
    (default: one built from the plan). `observer`: what a benchmark or a test sees of each pass and
    request (observe.py); none by default, and then nothing is recorded."""

    def __init__(
        self,
        model: CausalLM,
        eos_ids: list[int],
        plan: MemoryPlan,
        options: Options = Options(),
        attention: tuple[Backend, object] | None = None,
        runner: ModelRunner | None = None,
        observer: Observer | None = None,
    ):
        self.model, self.eos_ids, self.plan = model, eos_ids, plan
        self.options, self.observer = options, observer
        if runner is None:
            runner = ModelRunner(
                model,
                plan.num_blocks,
                plan.block_size,
                *(attention or (FALLBACK, ())),
                max_gather_tokens=plan.max_gather_tokens,
            )
        self.runner = runner
        self.blocks = BlockManager(plan.num_blocks, plan.block_size)
        # A decode pass reads every weight once and stays memory-bound up to about the device's
        # machine balance in tokens, so that many lookup drafts ride along free; the warm-up
        # measures it (warmup.tokens_at_one_token_cost), 128 until then.
        lookup = options.lookup_draft_tokens
        self.lookup_draft_tokens = (
            lookup if lookup is not None else 128 if model.device.type == "cuda" else 0
        )
        # The one stats object: the loop's counters, and the scheduler's (preemptions, drafts),
        # which it adds to.
        self.stats = Counter(dict.fromkeys(STATS, 0))

    @property
    def lookup_budget(self) -> int:
        """The pass size under which lookup drafts ride along in this engine's runs (0: none)."""
        return self._limits().lookup_draft_tokens

    def _limits(self) -> Limits:
        p, speculate, sources = self.plan, self.options.speculate, self.options.draft_sources
        looks_up = speculate and ("own" in sources or "pool" in sources)
        return Limits(
            max_num_seqs=p.max_num_seqs,
            max_batched_tokens=p.max_batched_tokens,
            max_gather_tokens=p.max_gather_tokens
            if self.runner.backend.gathers_whole_pass
            else None,
            max_drafts=p.max_drafts if speculate else 0,
            lookup_draft_tokens=self.lookup_draft_tokens if looks_up else 0,
            own_drafts="own" in sources,
            pool_drafts="pool" in sources,
        )

    def _collect(self, works: list[Work], pending: Pending) -> list[int]:
        """A launched pass's sampled tokens, the model's argmax (waits for that pass only); the
        observer hears of it."""
        tokens = self.runner.collect(pending)
        if self.observer is not None:
            self.observer.on_pass(
                PassRecord(
                    tokens=sum(len(w.tokens) for w in works),
                    requests=tuple(w.seq.index for w in works),
                    build_s=pending.t1 - pending.t0,
                    wait_s=pending.t2 - pending.t1,
                    graph=pending.graph,
                    started=pending.t0,
                    device=pending.device_span,
                )
            )
        return tokens

    def warmup(self, steps: tuple[str, ...] = WARMUP_STEPS) -> None:
        """Untimed preparation before the clock starts, in named steps (WARMUP_STEPS; a benchmark
        may take them one at a time): "token_table" reads a token table kept in the checkpoint's
        file once, so that its rows are in the page cache (loader.FileRows.warm), "gemms" meets
        every GEMM kernel a pass can ask for, "lookup_budget" measures the pass size under which
        lookup drafts ride along, "graphs" captures the CUDA graphs, "probe" runs competition-shaped
        requests (random ids) so that the allocators grow their pools now (graph capture empties the
        device cache, so it comes first). The prefix cache is left empty. Only the first step has
        anything to do off CUDA."""
        if "token_table" in steps:
            for module in self.model.modules():
                if isinstance(getattr(module, "rows", None), FileRows):
                    module.rows.warm()
        if self.model.device.type != "cuda":
            return
        p, runner = self.plan, self.runner
        if "gemms" in steps:
            graphs = (
                runner.backend.graphs_every_small_pass
                and p.cuda_graphs
                and self.options.cuda_graphs
            )
            meet_gemm_kernels(
                self.model,
                p.max_batched_tokens,
                p.max_num_seqs * (1 + p.max_drafts),
                runner.eager_padding,
                every_small_count=not graphs,
            )
        if "lookup_budget" in steps and self.options.lookup_draft_tokens is None:
            self.lookup_draft_tokens = tokens_at_one_token_cost(self.model, p.max_batched_tokens)
        if (
            "graphs" in steps
            and self.options.cuda_graphs
            and p.cuda_graphs
            and not len(runner.graphs)
        ):
            runner.capture_graphs(p.max_batched_tokens, p.max_num_seqs, p.max_gather_tokens)
        if "probe" in steps:
            self.generate(probe(p.max_batched_tokens, p.max_num_seqs))
        self.reset_prefix_cache()

    def report(self) -> Report:
        """What this engine holds and has counted (a copy)."""
        return Report(
            plan=self.plan,
            stats=dict(self.stats),
            graphs=len(self.runner.graphs),
            kv_bytes=self.runner.kv.nbytes,
            weight_bytes=sum(p.nbytes for p in self.model.parameters() if not p.is_meta),
            lookup_budget=self.lookup_budget,
            attention=self.describe(),
        )

    def describe(self) -> str:
        """The attention backend and kernels this engine runs (one line)."""
        runner, lookup = self.runner, self.lookup_budget
        return (
            f"attention: {runner.backend.name} backend ({runner.layouts[0].name}); elementwise "
            f"kernels {self.model.kernels.name}"
            + (
                f"; lookup drafts while a pass has < {lookup} tokens"
                if lookup
                else "; no lookup drafts"
            )
        )

    def release(self) -> None:
        """Give back the KV pool and the CUDA graphs; the model stays. The engine cannot run after
        this."""
        self.runner.release()

    def reset(self) -> None:
        """Forget every cached prompt prefix and zero the counters: a later call reuses nothing of
        an earlier one."""
        self.reset_prefix_cache()
        for name in self.stats:
            self.stats[name] = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (nothing may be running)."""
        self.blocks = BlockManager(self.plan.num_blocks, self.plan.block_size)

    def generate(
        self,
        seqs: Iterable[Sequence],
        on_finish: Callable[[Sequence], None] | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> list[Sequence]:
        """Run every sequence to completion (they are modified in place); returns them in input
        order.

        `seqs` may be lazy (a generator that tokenises as it goes): the engine draws what the first
        pass can hold, launches it, and draws the rest while the device works. `on_finish` callbacks
        also run while the device works on the next pass."""
        bar = tqdm(total=total, desc="generate", unit="req", disable=not progress)
        run = _Run(self, seqs, on_finish, bar)
        try:
            # A half pass first: the device starts after a fraction of the tokenisation, and that
            # pass runs long enough to hide the rest of it and the scheduling of the next pass.
            run.draw(self.plan.max_batched_tokens // 2)
            while run.step():
                pass
            run.scheduler.release_finished()
            run.report()  # the loop ends only once every failed request is among the finished
        finally:  # however the loop ends (an interrupt too), the bar is done before anyone reports
            bar.close()
        return sorted(run.taken, key=lambda s: s.index)


class _Run:
    """One generate() call: its scheduler, the requests drawn so far, the pass in flight (launched,
    not yet committed) and the finished requests not yet reported. step() is one turn of the loop.
    """

    def __init__(
        self,
        engine: Engine,
        seqs: Iterable[Sequence],
        on_finish: Callable[[Sequence], None] | None,
        bar,
    ):
        self.engine, self.on_finish, self.bar = engine, on_finish, bar
        self.scheduler = Scheduler(engine.blocks, engine._limits(), engine.eos_ids, engine.stats)
        self.source, self.taken = iter(seqs), []
        # Chained steps are fed the argmax on the device: not where the host looks the token table's
        # rows up itself.
        self.chain = engine.options.chain_decode and not engine.model.embedding_on_host
        self.in_flight: tuple[list[Work], Pending] | None = None
        self.finished: list[Sequence] = []

    def draw(self, tokens: int | None) -> None:
        """Hand the scheduler requests until `tokens` prompt tokens are drawn (None: all); it orders
        them."""
        drawn, queued = [], 0
        for seq in self.source:
            drawn.append(seq)
            queued += seq.num_tokens
            if tokens is not None and queued >= tokens:
                break
        self.scheduler.add_all(drawn)
        self.taken.extend(drawn)

    def report(self) -> None:
        observer = self.engine.observer
        for seq in self.finished:
            if observer is not None:
                observer.on_finished(seq.index, seq.generated)
            if self.on_finish is not None:
                self.on_finish(seq)
            self.bar.update(1)
        self.finished = []

    def commit(self) -> None:
        """Commit the pass in flight (its tokens are waited for): the scheduler takes them, finished
        requests wait to be reported."""
        if self.in_flight is None:
            return
        works, pending = self.in_flight
        self.in_flight = None
        tokens, stats = self.engine._collect(works, pending), self.engine.stats
        stats["passes"] += 1
        stats["prefill_tokens"] += sum(len(w.tokens) for w in works if not w.decode)
        stats["max_batch"] = max(stats["max_batch"], len(works))
        self.finished += self.scheduler.postprocess(works, tokens)

    def next_pass(self) -> tuple[list[Work], bool]:
        """The next pass's works, and whether its decode steps are chained to the pass in flight. It
        is scheduled before the pass in flight is committed, so that the device does not wait for
        the host: with that pass's decode steps chained to it where they will draft nothing (fed
        their tokens on the device), else with sequences outside it if it is nearly full. Otherwise
        it waits for the pass in flight and is topped up with that pass's sequences' next steps: a
        pass launched ahead half empty would cost a whole weight read."""
        scheduler = self.scheduler
        chained = (
            scheduler.chain(self.in_flight[0]) if self.chain and self.in_flight is not None else []
        )
        works = chained + scheduler.schedule(chained)
        small = sum(len(w.tokens) for w in works) < AHEAD_FILL * self.engine.plan.max_batched_tokens
        if not chained and self.in_flight is not None and small:
            self.commit()
            works += scheduler.schedule(works)
        return works, bool(chained)

    def launch(self, works: list[Work], chained: bool) -> tuple[list[Work], Pending] | None:
        """Launch a pass; None if the device ran out of memory (the pass is undone and the limits
        halved)."""
        engine = self.engine
        try:
            pending = engine.runner.launch(works, self.in_flight[1] if chained else None)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            self.commit()
            self.scheduler.rollback(works)
            engine.stats["oom_retries"] += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        engine.stats["chained_passes"] += chained
        return works, pending

    def step(self) -> bool:
        """Schedule and launch the next pass, then, while the device runs it, draw the remaining
        requests, report the finished ones and commit the pass before it. False once every request
        has finished."""
        scheduler = self.scheduler
        if not (scheduler.has_work or scheduler.failed):
            return False
        # given up on (seq.error): reported like finished ones
        self.finished += scheduler.take_failed()
        works, chained = self.next_pass()
        launched = None
        if works:
            launched = self.launch(works, chained)
            if launched is None:
                return True  # retried smaller
        elif self.in_flight is None:
            if scheduler.failed:
                return True
            if scheduler.has_work:
                raise RuntimeError("the scheduler could not place any sequence (this is a bug)")
            return False  # the pass just committed finished the last sequences
        # host work that overlaps the device: the remaining requests, the last pass's results
        self.draw(None)
        self.report()
        scheduler.release_finished()
        self.commit()
        self.in_flight = launched
        return True
