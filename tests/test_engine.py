"""The generation loop runs one pass ahead when it can fill it: the next pass is launched before the last one is
committed, never with a sequence of the pass still in flight except its chained decode step (fed its token on the
device), and the output stays the pipeline's; with a fake runner (the unit tier), the loop commits each request's
greedy tokens through big, small and starved passes, chained or not."""

from types import SimpleNamespace

import pytest
from conftest import NEW, generator


def test_next_pass_launches_before_the_last_is_committed(
    tiny_dir, public_chats, longest_chat, expected
):
    gen = generator(
        tiny_dir, max_batched_tokens=96, max_num_seqs=16
    )  # prompts of 85-120 tokens fill a pass
    runner, events, chained = gen.engine.runner, [], []
    launch, collect = runner.launch, runner.collect

    def recording_launch(works, fed_by=None):
        pending = launch(works, fed_by)
        events.append(("launch", {id(w.seq) for w in works if w.fed_row < 0}, pending))
        chained.append(sum(w.fed_row >= 0 for w in works))
        return pending

    def recording_collect(pending):
        events.append(("collect", None, pending))
        return collect(pending)

    runner.launch, runner.collect = recording_launch, recording_collect
    outs = gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False)
    assert outs == expected

    in_flight, overlapped = {}, 0
    for kind, seqs, pending in events:
        if kind == "launch":
            for other in in_flight.values():
                assert not seqs & other, (
                    "a sequence was scheduled while its previous pass was in flight"
                )
            overlapped += bool(in_flight)
            in_flight[id(pending)] = seqs
        else:
            del in_flight[id(pending)]
        assert len(in_flight) <= 2
    assert not in_flight
    assert overlapped >= 5  # prompt chunks were launched ahead
    assert sum(chained) > 0 and gen.engine.stats["chained_passes"] == sum(map(bool, chained))


def test_chained_decode_steps_give_the_pipelines_text(
    tiny_dir, public_chats, longest_chat, expected
):
    """The same text with and without chaining, every request of a small batch chained at least once."""
    from orinfer.options import Options

    gen = generator(tiny_dir, Options(speculate=False))
    assert (
        gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False) == expected
    )
    assert gen.engine.stats["chained_passes"] >= NEW - 2


class FakeRunner:
    """A model in one line, for the loop alone: the greedy token after a sequence is a function of its last token
    and its length, <|end|> (token 2 here) now and then."""

    graphs: dict = {}
    # The scheduler then bounds a pass's gathered keys, as for a backend that gathers a whole pass (varlen).
    backend = SimpleNamespace(gathers_whole_pass=True, graphs_every_small_pass=True)

    @staticmethod
    def next_token(tokens: list[int]) -> int:
        t = (tokens[-1] * 7 + len(tokens) * 3) % 61
        return 2 if t == 5 else 100 + t

    def launch(self, works, fed_by=None):
        import time

        from orinfer.runner import Pending

        out = []
        for w in works:
            if w.wants_logits:  # the argmax after each of the last 1 + num_drafts fed tokens
                fed = (
                    [fed_by.on_device[w.fed_row]] if w.fed_row >= 0 else w.tokens
                )  # a chained step's token
                known = w.seq.token_ids[: w.start] + fed
                out += [
                    self.next_token(known[: w.start + j + 1])
                    for j in range(len(fed) - 1 - w.num_drafts, len(fed))
                ]
        now = time.perf_counter()
        return Pending(out=out, began=None, ready=None, t0=now, t1=now, graph=False, on_device=out)

    def collect(self, pending):
        pending.t2 = pending.t1
        return pending.out


def fake_engine(observer=None, options=None, **plan):
    from types import SimpleNamespace

    import torch

    from orinfer.engine import Engine
    from orinfer.memory import MemoryPlan
    from orinfer.options import Options

    limits = dict(
        budget=0,
        weights=0,
        overhead=0,
        overhead_items=(),
        kv_bytes=0,
        workspace_bytes=0,
        num_blocks=4000,
        block_size=1,
        max_num_seqs=16,
        max_batched_tokens=256,
        max_gather_tokens=1 << 20,
        max_drafts=4,
        cuda_graphs=False,
        attention_afforded=False,
        attention="padded",
    )
    model = SimpleNamespace(
        device=torch.device("cpu"), dtype=torch.float32, embedding_on_host=False
    )
    return Engine(
        model,
        [2],
        MemoryPlan(**{**limits, **plan}),
        Options(lookup_draft_tokens=64, **(options or {})),
        runner=FakeRunner(),
        observer=observer,
    )


def greedy(prompt: list[int], new: int) -> list[int]:
    tokens = list(prompt)
    while len(tokens) - len(prompt) < new and (len(tokens) == len(prompt) or tokens[-1] != 2):
        tokens.append(FakeRunner.next_token(tokens))
    return tokens[len(prompt) :]


def requests(count: int, new: int, candidates=None):
    import random

    from orinfer.sequence import Sequence

    rng = random.Random(1)
    shared = [100 + j for j in range(12)]  # a shared instruction, as in the competition's prompts
    prompts = [
        shared + [rng.randrange(100, 161) for _ in range(rng.randint(1, 40))] for _ in range(count)
    ]
    return [
        Sequence(
            index=i,
            token_ids=list(p),
            num_prompt_tokens=len(p),
            max_new_tokens=new,
            candidates=candidates(i, p) if candidates else [],
        )
        for i, p in enumerate(prompts)
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    "plan",
    [{}, {"max_batched_tokens": 24, "max_num_seqs": 4}, {"num_blocks": 300, "max_num_seqs": 12}],
)
def test_the_loop_commits_each_requests_greedy_tokens(plan):
    """Big passes, chunked prompts in small ones, and a cache too small for all (preemption and recomputation):
    every request finishes once, with the greedy tokens, in input order."""
    engine, seqs = fake_engine(**plan), requests(40, 30)
    expected = [greedy(s.token_ids, 30) for s in seqs]
    finished = []
    out = engine.generate(iter(seqs), on_finish=lambda s: finished.append(s.index))
    assert [s.generated for s in out] == expected and sorted(finished) == list(range(40))
    if "num_blocks" in plan:
        assert engine.stats["preemptions"] > 0


@pytest.mark.unit
@pytest.mark.parametrize(
    "plan",
    [{}, {"max_batched_tokens": 24, "max_num_seqs": 4}, {"num_blocks": 150, "max_num_seqs": 12}],
)
def test_chained_decode_steps_commit_each_requests_greedy_tokens(plan):
    """Without drafts, decode steps are chained to the pass in flight: requests that end with <|end|> in that pass
    (their chained step is dropped), at max_new_tokens (left out of the chain), or are preempted all commit the
    greedy tokens, as without chaining."""

    def seqs():
        out = requests(40, 30)
        for i, s in enumerate(out):
            s.max_new_tokens = 5 + i % 26
        return out

    expected = [greedy(s.token_ids, s.max_new_tokens) for s in seqs()]
    assert any(
        e[-1] == 2 and len(e) < s.max_new_tokens for e, s in zip(expected, seqs())
    )  # some end early
    stats = {}
    for chain in (True, False):
        engine = fake_engine(options={"speculate": False, "chain_decode": chain}, **plan)
        assert [s.generated for s in engine.generate(iter(seqs()))] == expected
        stats[chain] = engine.stats
    assert (
        stats[True]["chained_passes"] > stats[True]["passes"] // 2
        and stats[False]["chained_passes"] == 0
    )
    if "num_blocks" in plan:
        assert stats[True]["preemptions"] > 0


@pytest.mark.unit
@pytest.mark.parametrize("wrong_at", [None, 0, 3])
def test_drafts_are_kept_only_where_they_equal_the_argmax(wrong_at):
    from orinfer.observe import Observer

    def candidate(i, prompt):
        answer = greedy(prompt, 12)
        if wrong_at is not None and len(answer) > wrong_at + 1:
            answer[wrong_at + 1] += 1
        return [answer]

    plain, drafted = fake_engine(), fake_engine(observer=Observer())
    without = [s.generated for s in plain.generate(requests(30, 12))]
    assert [s.generated for s in drafted.generate(requests(30, 12, candidate))] == without
    proposed, accepted = drafted.stats["draft_tokens"], drafted.stats["accepted_drafts"]
    assert accepted > 0 and (proposed == accepted) == (wrong_at is None)
    if wrong_at is None:  # right drafts: the answer verified a few tokens a pass (max_drafts 4)
        assert drafted.stats["passes"] < plain.stats["passes"]
        assert max(drafted.observer.passes_per_request().values()) <= 4


@pytest.mark.unit
def test_every_committed_token_is_the_models_argmax_whatever_the_observer():
    """The product has no path by which anything but the runner's argmax becomes an output token: an observer sees
    passes and results and has no say in them (scripted answers live in bench/, in an engine of the benchmark's)."""
    from orinfer.observe import Observer

    class Meddling(Observer):
        def force(self, sampled):  # the hook this engine once had: nothing calls it now
            raise AssertionError("the engine asked an observer for tokens")

        def on_pass(self, record):
            super().on_pass(record)
            self.seen = True

    assert not hasattr(Observer, "force") and not hasattr(Observer, "forces_tokens")
    meddled = fake_engine(observer=Meddling())
    expected = [s.generated for s in fake_engine().generate(requests(12, 9))]
    assert [
        s.generated for s in meddled.generate(requests(12, 9))
    ] == expected and meddled.observer.seen
    assert meddled.stats["chained_passes"] > 0  # an observer no longer turns chaining off
