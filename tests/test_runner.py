"""The runner's inputs padded to a CUDA graph's shape give the tokens of the unpadded pass (the graphs themselves
need a GPU; the padded inputs they replay are built and run here, eagerly, on the CPU)."""
import pytest
import torch
from conftest import generator
from test_attention import reference_varlen

from orinfer import attention


@pytest.mark.parametrize("layout", ["varlen", "padded"])
def test_inputs_padded_to_a_graph_shape_give_the_same_tokens(tiny_dir, public_chats, layout, monkeypatch):
    if layout == "varlen":  # any pass: prefill chunks, decode steps and drafts mixed, in a small token budget
        monkeypatch.setattr(attention, "varlen_kernel", reference_varlen)
        monkeypatch.setattr("orinfer.runner.varlen_supported", lambda device, dtype: True)
        gen = generator(tiny_dir, max_batched_tokens=64, max_num_seqs=6)
    else:  # plain decode steps only
        gen = generator(tiny_dir, speculate=False, max_num_seqs=6)
    runner = gen.engine.runner
    compared = []
    launch = runner.launch

    @torch.inference_mode()
    def compare_then_launch(works):
        plain = runner.model(*runner.context(works)).tolist()
        if layout == "varlen":
            tokens = sum(len(w.tokens) for w in works)
            shape = (tokens + 5, sum(w.start + len(w.tokens) for w in works) + 5 + 30)
        elif all(len(w.tokens) == 1 for w in works):
            shape = (len(works) + 3, -(-max(w.start + 1 for w in works) // runner.block_size) + 2)
        else:
            return launch(works)
        ids, ctx = runner.context(works, shape)
        assert ids.numel() == shape[0]
        compared.append(len(works))
        assert runner.model(ids, ctx).tolist()[:len(plain)] == plain
        return launch(works)

    monkeypatch.setattr(runner, "launch", compare_then_launch)
    gen(public_chats[:6], max_new_tokens=12, return_full_text=False)
    assert len(compared) >= 5 and max(compared) > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graph_replays_give_the_eager_passes_tokens_on_cuda(tiny_dir, public_chats):
    import optimize
    outs = {}
    for graphs in (False, True):
        gen = optimize.build(tiny_dir, device="cuda", dtype="bfloat16", progress=False)
        gen.warmup(cuda_graphs=graphs)
        assert bool(gen.engine.runner.graphs) == graphs
        outs[graphs] = gen(public_chats, max_new_tokens=24, return_full_text=False)
        replayed = sum(log[4] for log in gen.engine.runner.pass_log)
    assert replayed > 10 and outs[True] == outs[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_launching_a_pass_never_waits_for_the_device_on_cuda(tiny_dir, public_chats):
    # The engine launches a pass while the one before it runs: building inputs, the forward and the copy of the
    # sampled tokens must all be queued without a host-device synchronisation (graph replays and eager passes).
    import optimize
    gen = optimize.build(tiny_dir, device="cuda", dtype="bfloat16", progress=False)
    gen.warmup()
    runner, launch = gen.engine.runner, gen.engine.runner.launch

    def strict_launch(works):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(works)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    runner.launch = strict_launch
    start = len(runner.pass_log)
    gen(public_chats, max_new_tokens=24, return_full_text=False)
    graphs = [log[4] for log in runner.pass_log[start:]]
    assert any(graphs) and not all(graphs)  # both kinds were launched under the check
