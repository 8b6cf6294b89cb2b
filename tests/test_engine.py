"""The generation loop runs one pass ahead when it can fill it: the next pass is launched before the last one is
committed, never with a sequence of the pass still in flight, and the output stays the pipeline's."""
from conftest import NEW, generator


def test_next_pass_launches_before_the_last_is_committed(tiny_dir, public_chats, longest_chat, expected):
    gen = generator(tiny_dir, max_batched_tokens=96, max_num_seqs=16)  # prompts of 85-120 tokens fill a pass
    runner, events = gen.engine.runner, []
    launch, collect = runner.launch, runner.collect

    def recording_launch(works):
        pending = launch(works)
        events.append(("launch", {id(w.seq) for w in works}, pending))
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
                assert not seqs & other, "a sequence was scheduled while its previous pass was in flight"
            overlapped += bool(in_flight)
            in_flight[id(pending)] = seqs
        else:
            del in_flight[id(pending)]
        assert len(in_flight) <= 2
    assert not in_flight
    assert overlapped >= 5  # prompt chunks were launched ahead
