"""The runner's inputs padded to a CUDA graph's shape give the tokens of the unpadded pass (the graphs themselves
need a GPU; the padded inputs they replay are built and run here, eagerly, on the CPU)."""

import pytest
import torch
from conftest import NEW, generator
from test_attention import reference_layout, reference_packed_layout  # noqa: F401 (fixtures)

from orinfer.attention.core import PAD_ABOVE
from orinfer.attention.reference import reference_packed

from orinfer.observe import Observer
from orinfer.options import Options
from orinfer.sequence import Sequence, Work


@pytest.mark.parametrize("layout", ["varlen", "packed", "padded"])
def test_inputs_padded_to_a_graph_shape_give_the_same_tokens(
    tiny_dir, public_chats, layout, monkeypatch, reference_layout, reference_packed_layout
):
    if (
        layout != "padded"
    ):  # any pass: prefill chunks, decode steps and drafts mixed, in a small token budget
        # (with the packed kernel a graph gives every sequence to it, prompt chunks too)
        gen = generator(
            tiny_dir,
            attention=reference_packed_layout if layout == "packed" else reference_layout,
            max_batched_tokens=64,
            max_num_seqs=6,
        )
    else:  # plain decode steps only
        gen = generator(tiny_dir, Options(speculate=False), max_num_seqs=6)
    runner = gen.engine.runner
    compared = []
    launch = runner.launch

    @torch.inference_mode()
    def compare_then_launch(works, fed_by=None):
        feed = fed_by.on_device if fed_by is not None else None
        plain = runner.model(*runner.context(works, feed=feed)).tolist()
        if layout != "padded":
            tokens = sum(len(w.tokens) for w in works)
            shape = (tokens + 5, sum(w.start + len(w.tokens) for w in works) + 5 + 30)
        elif all(len(w.tokens) == 1 for w in works):
            shape = (len(works) + 3, -(-max(w.start + 1 for w in works) // runner.block_size) + 2)
        else:
            return launch(works, fed_by)
        ids, ctx = runner.context(works, shape, feed)
        assert ids.numel() == shape[0]
        if layout == "padded":  # a graph's shape is one group of the padded layout
            assert len(ctx.layout.groups) == 1
        compared.append(len(works))
        assert runner.model(ids, ctx).tolist()[: len(plain)] == plain
        return launch(works, fed_by)

    monkeypatch.setattr(runner, "launch", compare_then_launch)
    gen(public_chats[:6], max_new_tokens=12, return_full_text=False)
    assert len(compared) >= 5 and max(compared) > 1
    if layout == "packed":
        assert any(
            first == 0 and most > reference_packed_layout[1]
            for first, most in reference_packed.calls
        )


def test_eager_passes_padded_to_a_multiple_give_the_pipelines_text(
    reference_packed_layout, tiny_dir, public_chats, longest_chat, expected, monkeypatch
):
    """An H200 pads eager passes above 512 tokens to a multiple of 64 (tokens and sampled rows); here passes above 4
    tokens to a multiple of 16, long prompt chunks and the packed kernel's few new tokens mixed."""
    gen = generator(tiny_dir, attention=reference_packed_layout, padding=(4, 16))
    runner, padding = gen.engine.runner, []
    context = runner.context

    def checked_context(works, shape=None, feed=None):
        ids, ctx = context(works, shape, feed)
        tokens = sum(len(w.tokens) for w in works)
        if tokens > 4:
            assert ids.numel() % 16 == 0 and ctx.sample_rows.numel() % 16 == 0
            padding.append(ids.numel() - tokens)
        return ids, ctx

    monkeypatch.setattr(runner, "context", checked_context)
    assert (
        gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False) == expected
    )
    assert any(padding)


def test_the_padded_layouts_passes_padded_to_a_multiple_give_the_pipelines_text(
    tiny_dir, public_chats, longest_chat, expected, monkeypatch
):
    """The padded layout pads an eager pass of more than 1,024 tokens to a multiple of 64 (one-token sequences in a
    group of their own, attending to the scratch block); here every pass to a multiple of 16, prompt chunks, decode
    steps and drafts mixed: the pipeline's text."""
    gen = generator(tiny_dir, padding=(PAD_ABOVE, 16), max_batched_tokens=256, max_num_seqs=64)
    runner, padding = gen.engine.runner, []
    runner.layouts[0].pad_above = 0
    context = runner.context

    def checked_context(works, shape=None, feed=None):
        ids, ctx = context(works, shape, feed)
        assert ids.numel() % 16 == 0 and ctx.sample_rows.numel() % 16 == 0
        padding.append(ids.numel() - sum(len(w.tokens) for w in works))
        return ids, ctx

    monkeypatch.setattr(runner, "context", checked_context)
    assert (
        gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False) == expected
    )
    assert any(padding) and max(padding) < 16


def test_a_pass_with_a_long_prompt_chunk_runs_eagerly(reference_packed_layout, tiny_dir):
    """A graph gives every sequence to the packed kernel; a pass holding a chunk longer than it takes runs eagerly."""
    runner = generator(tiny_dir, attention=reference_packed_layout).engine.runner
    runner.graphs.captured, runner.graphs.dims = (
        {(16, 1024): None},
        ([16], [1024]),
    )  # as if captured
    seq = Sequence(
        index=0,
        token_ids=list(range(100, 120)),
        num_prompt_tokens=20,
        max_new_tokens=1,
        block_table=list(range(1, 21)),
    )
    assert runner.graphs.shape_for(
        [Work(seq=seq, tokens=seq.token_ids[:8], start=0, wants_logits=False, admitted=True)]
    ) == (16, 1024)
    assert (
        runner.graphs.shape_for(
            [Work(seq=seq, tokens=seq.token_ids[:9], start=0, wants_logits=False, admitted=True)]
        )
        is None
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graph_replays_give_the_eager_passes_tokens_on_cuda(tiny_dir, public_chats):
    import optimize

    outs = {}
    for graphs in (False, True):
        observer = Observer()
        gen = optimize.build(
            tiny_dir,
            device="cuda",
            dtype="bfloat16",
            progress=False,
            observer=observer,
            options=Options(cuda_graphs=graphs),
        )
        gen.warmup()
        assert bool(len(gen.engine.runner.graphs)) == graphs
        if (
            graphs and gen.engine.runner.backend.gathers_whole_pass
        ):  # one key-slot buffer for the graphs of each extent
            slots = {}
            for (size, extent), (_, _, ctx, _) in gen.engine.runner.graphs.captured.items():
                slots.setdefault(extent, set()).add(ctx.layout.key_slots.data_ptr())
            assert all(len(ptrs) == 1 for ptrs in slots.values()) and len(slots) > 1
        outs[graphs] = gen(public_chats, max_new_tokens=24, return_full_text=False)
        replayed = sum(record.graph for record in observer.passes)
    assert replayed > 10 and outs[True] == outs[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_launching_a_pass_never_waits_for_the_device_on_cuda(tiny_dir, public_chats):
    # The engine launches a pass while the one before it runs: building inputs, the forward and the copy of the
    # sampled tokens must all be queued without a host-device synchronisation (graph replays and eager passes).
    import optimize

    observer = Observer()
    gen = optimize.build(
        tiny_dir, device="cuda", dtype="bfloat16", progress=False, observer=observer
    )
    gen.warmup()
    runner, launch = gen.engine.runner, gen.engine.runner.launch

    def strict_launch(works, fed_by=None):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(works, fed_by)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    runner.launch = strict_launch
    start = len(observer.passes)
    gen(public_chats, max_new_tokens=24, return_full_text=False)
    graphs = [record.graph for record in list(observer.passes)[start:]]
    assert any(graphs) and not all(graphs)  # both kinds were launched under the check
