"""Attention: the sliding window as the installed transformers applies it, and the varlen layout (the layout the
FlashAttention kernel gets on GPUs) giving the pipeline's output; the kernel itself is checked where CUDA exists."""

from types import SimpleNamespace

import pytest
import torch
from conftest import NEW, generator, hf_pipeline, reference

import optimize
from orinfer.attention import packed, padded, paged, varlen
from orinfer.attention.reference import reference_packed, reference_paged, reference_varlen
from orinfer.sequence import Sequence, Work
from orinfer.tiny import write_tiny_model


@pytest.fixture
def reference_layout():
    """The reference backend for generators built in a test: the varlen layout with its float32 kernels (this is
    the CPU), no packed kernel."""
    reference_varlen.calls = 0
    return ("reference", 0)


@pytest.fixture
def reference_packed_layout():
    """As `reference_layout`, with sequences of few new tokens given to the packed kernel (its reference): at most
    8, so that the tiny model's passes mix the two kernels as W1's do with 128."""
    reference_varlen.calls, reference_packed.calls = 0, []
    return ("reference", 8)


@pytest.mark.parametrize("window", [24, 50])
def test_sliding_window_matches_pipeline(tmp_path, public_chats, window):
    folder = write_tiny_model(tmp_path, seed=1, std=0.1, sliding_window=window)
    chats = public_chats[:6]
    expected = reference(hf_pipeline(folder), chats, max_new_tokens=30, return_full_text=False)
    assert generator(folder)(chats, max_new_tokens=30, return_full_text=False) == expected
    unwindowed = write_tiny_model(tmp_path / "full", seed=1, std=0.1)
    same_without_window = (
        generator(unwindowed)(chats, max_new_tokens=30, return_full_text=False) == expected
    )
    # Where the window applies it really changes the answer here, or this test would prove nothing.
    assert same_without_window != optimize.SLIDING_WINDOW_APPLIES


def test_keys_past_the_sliding_window_take_the_padded_layout(reference_layout, tmp_path):
    gen = generator(write_tiny_model(tmp_path, sliding_window=24), attention=reference_layout)
    runner = gen.engine.runner
    bs = runner.block_size
    table = list(range(40, 40 - (-30 // bs)))[::-1]  # blocks out of order, as a pool hands them out
    seq = Sequence(
        index=0,
        token_ids=list(range(100, 130)),
        num_prompt_tokens=30,
        max_new_tokens=1,
        block_table=table,
    )

    def slot(p):
        return table[p // bs] * bs + p % bs

    inside = runner.context(
        [Work(seq=seq, tokens=seq.token_ids[:24], start=0, wants_logits=False, admitted=True)]
    )[1]
    past = runner.context([Work(seq=seq, tokens=seq.token_ids[24:], start=24, wants_logits=True)])[
        1
    ]
    assert isinstance(inside.layout, varlen.Varlen)
    # (transformers < 4.46 ignores the window, and so does the engine then: no reason to leave the varlen layout)
    assert isinstance(past.layout, padded.Padded) == optimize.SLIDING_WINDOW_APPLIES
    assert inside.layout.key_slots.tolist() == [slot(p) for p in range(24)]
    assert past.slots.tolist() == [slot(p) for p in range(24, 30)]
    assert past.positions.tolist() == list(range(24, 30))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("gather", [1 << 20, 16])
def test_padded_mask_is_causal_within_the_window(tiny_dir, window, gather):
    """The masks the runner's grid rows pick out of one table per group (build_bias) against the rule written out: a
    query at position p sees keys p - window < j <= p of its own sequence, a padding cell key 0 only. The sequences
    go into groups by their count of new tokens (3 and 3, then 1), the longest keys first, and with a small gather
    bound one a group; each group's tokens are a run of the pass's."""
    runner = generator(tiny_dir, max_gather_tokens=gather).engine.runner
    for layout in runner.layouts:
        layout.sliding_window = window
    bs = runner.block_size
    seqs = [
        Sequence(
            index=i,
            token_ids=list(range(n)),
            num_prompt_tokens=n,
            max_new_tokens=1,
            block_table=list(range(1 + 40 * i, 1 + 40 * i - (-n // bs))),
        )
        for i, n in enumerate((7, 3, 19))
    ]
    works = [
        Work(seq=seqs[0], tokens=seqs[0].token_ids[4:], start=4, wants_logits=True),
        Work(seq=seqs[1], tokens=seqs[1].token_ids, start=0, wants_logits=True, admitted=True),
        Work(seq=seqs[2], tokens=seqs[2].token_ids[18:], start=18, wants_logits=True),
    ]
    ids, ctx = runner.context(works)
    lay = ctx.layout
    assert isinstance(lay, padded.Padded)
    by_group = (
        [[works[0]], [works[1]], [works[2]]] if gather == 16 else [[works[0], works[1]], [works[2]]]
    )
    assert [g.block_tables.shape[0] for g in lay.groups] == [len(g) for g in by_group]
    assert ids.tolist() == [t for group in by_group for w in group for t in w.tokens]
    groups = 2
    for group, members in zip(lay.groups, by_group):
        bias = padded.build_bias(group, bs, groups, torch.float32, window)
        batch, _, rows, keys = bias.shape
        qmax = rows // groups
        assert (
            batch == len(members) and qmax == max(len(w.tokens) for w in members) and keys % 16 == 0
        )
        assert keys * batch <= max(gather, keys)
        for b, w in enumerate(members):
            for q in range(qmax):
                p = w.start + q if q < len(w.tokens) else None
                seen = [
                    j
                    for j in range(keys)
                    if (j == 0 if p is None else j <= p and (window is None or p - j < window))
                ]
                for g in range(groups):
                    assert (bias[b, 0, q * groups + g] == 0).nonzero().flatten().tolist() == seen


@pytest.mark.parametrize("gather", [16, 48])
def test_padded_layout_in_groups_matches_pipeline(
    tiny_dir, public_chats, longest_chat, expected, gather
):
    """Passes whose sequences go into several groups of gathered keys (a bound of 16 or 48 keys: a group a sequence,
    or a few) give the pipeline's text."""
    gen = generator(tiny_dir, max_gather_tokens=gather)
    groups = []
    context = gen.engine.runner.context

    def counted(works, shape=None, feed=None):
        ids, ctx = context(works, shape, feed)
        groups.append(len(ctx.layout.groups))
        return ids, ctx

    gen.engine.runner.context = counted
    assert (
        gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False) == expected
    )
    assert max(groups) > 1


@pytest.mark.parametrize("plan", [{}, {"max_batched_tokens": 48, "max_num_seqs": 4}])
def test_varlen_layout_matches_pipeline(
    reference_layout, tiny_dir, public_chats, longest_chat, expected, plan
):
    """Whole prompts, shared-prefix reuse, prompts prefilled in chunks behind their own cached tokens, drafts."""
    gen = generator(tiny_dir, attention=reference_layout, **plan)
    assert (
        gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False) == expected
    )
    assert (
        reference_varlen.calls
        == gen.engine.stats["passes"] * gen.engine.model.cfg.num_hidden_layers
    )


@pytest.mark.parametrize("plan", [{}, {"max_batched_tokens": 48, "max_num_seqs": 4}])
def test_packed_kernel_for_few_new_tokens_matches_pipeline(
    reference_packed_layout, tiny_dir, public_chats, longest_chat, expected, plan
):
    """Passes whose prompt chunks go to FlashAttention and whose decode and draft tokens go to the packed kernel:
    the runner lays out long chunks first, and the sampled rows still come back in the works' order."""
    gen = generator(tiny_dir, attention=reference_packed_layout, **plan)
    assert (
        gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False) == expected
    )
    assert reference_varlen.calls > 0 and reference_packed.calls
    assert all(most <= reference_packed_layout[1] for _, most in reference_packed.calls)
    assert any(first > 0 for first, _ in reference_packed.calls), "no pass mixed the two kernels"


def test_varlen_is_not_claimed_on_the_cpu():
    assert not varlen.varlen_supported(torch.device("cpu"), torch.float32)
    assert not packed.supported(torch.device("cpu"), torch.bfloat16, 40, 10, 128)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the FlashAttention kernel needs a CUDA GPU"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_varlen_kernel_equals_the_reference(dtype):
    """Sequences with and without cached prefixes, single tokens and long chunks; fresh random data each time."""
    dev = torch.device("cuda")
    assert varlen.varlen_supported(dev, dtype)
    new = [1, 37, 5, 200, 1, 64]
    prefix = [0, 36, 120, 0, 900, 3]
    cu_q = torch.tensor([0] + new, device=dev).cumsum(0).int()
    cu_k = torch.tensor([0] + [n + p for n, p in zip(new, prefix)], device=dev).cumsum(0).int()
    q = torch.randn(sum(new), 50, 128, device=dev, dtype=dtype)[
        :, :40
    ]  # the model's query: a view of q and k
    k, v = (torch.randn(int(cu_k[-1]), 10, 128, device=dev, dtype=dtype) for _ in range(2))
    out = varlen._flash_varlen(
        q, k, v, cu_q, cu_k, max(new), max(n + p for n, p in zip(new, prefix)), 128**-0.5
    )
    ref = reference_varlen(
        q.float(),
        k.float(),
        v.float(),
        cu_q,
        cu_k,
        max(new),
        max(n + p for n, p in zip(new, prefix)),
        128**-0.5,
    )
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the packed kernel needs a CUDA GPU with Triton"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("copies", [1, 10])
def test_packed_kernel_equals_the_reference(dtype, copies):
    """Decode steps and drafts after cached prefixes, a sequence longer than a tile (a graph's pass may bring one),
    an empty one (a graph's padding); only the given sequences' rows are written. Ten copies make a launch of
    enough sequences for the 16-row tiles of its decode steps."""
    dev = torch.device("cuda")
    assert packed.supported(dev, dtype, 40, 10, 128)
    new = [40] + [1, 17, 5, 0, 33, 1, 2] * copies
    prefix = [0] + [0, 80, 300, 0, 64, 1500, 7] * copies
    cu_q = torch.tensor([0] + new, device=dev).cumsum(0).int()
    cu_k = torch.tensor([0] + [n + p for n, p in zip(new, prefix)], device=dev).cumsum(0).int()
    q = torch.randn(sum(new), 50, 128, device=dev, dtype=dtype)[
        :, :40
    ]  # the model's query: a view of q and k
    keys = int(cu_k[-1])
    k_rows, v_rows = (
        torch.randn(keys + 500, 10, 128, device=dev, dtype=dtype) for _ in range(2)
    )  # a "cache"
    slots = torch.randperm(keys + 500, device=dev)[:keys]  # each key's row in it, out of order
    out = torch.full_like(q, float("nan"))
    packed.packed_attention(q, k_rows, v_rows, out, cu_q, cu_k, slots, 1, len(new) - 1, 128**-0.5)
    k, v = k_rows[slots], v_rows[slots]
    ref = reference_varlen(
        q.float(), k.float(), v.float(), cu_q, cu_k, max(new), int(cu_k.diff().max()), 128**-0.5
    )
    assert out[: new[0]].isnan().all()
    assert (out[new[0] :].float() - ref[new[0] :]).norm() / ref[new[0] :].norm() < 1e-2


@pytest.mark.unit
def test_the_registry_plans_the_preferred_backend_that_runs_on_the_device():
    from orinfer.attention import BACKENDS, planned

    assert (
        planned(None, "cuda") is BACKENDS["varlen"] and planned(None, "cpu") is BACKENDS["padded"]
    )
    assert planned("reference", "cpu") is BACKENDS["reference"]
    with pytest.raises(ValueError, match="unknown; choose among varlen, paged, padded, reference"):
        planned("flashinfer", "cuda")
    with pytest.raises(ValueError, match="runs on cuda, not cpu"):
        planned("varlen", "cpu")


def test_a_backend_asked_for_by_name_never_falls_back_silently(tiny_dir, monkeypatch):
    from dataclasses import replace

    from orinfer.attention import BACKENDS, resolve

    cfg = optimize.prepare(tiny_dir, device="cpu").cfg
    with pytest.raises(RuntimeError, match="'reference' is not afforded by the memory plan"):
        resolve("reference", False, torch.device("cpu"), torch.float32, cfg, 0)
    # The default on a CUDA device plans varlen; where the plan affords it no host memory (an Orin),
    # the paged kernel runs where the extension is built, else the padded layout (a stand-in device
    # and kernel: the padded layout's kernels are never asked for).
    cuda = SimpleNamespace(type="cuda")
    backend, _ = resolve(None, False, cuda, torch.bfloat16, cfg, 0)
    assert backend is BACKENDS["padded"]
    stand_in = replace(BACKENDS["paged"], kernels=lambda *shape: "kernel")
    monkeypatch.setitem(BACKENDS, "paged", stand_in)
    assert resolve(None, False, cuda, torch.bfloat16, cfg, 0, cuda_extension=True)[0] is stand_in
    # the paged kernel is orinfer's CUDA extension's: never taken where the options turned it off
    with pytest.raises(RuntimeError, match="'paged' needs orinfer's CUDA extension"):
        resolve("paged", True, cuda, torch.bfloat16, cfg, 0, cuda_extension=False)


def test_a_new_backend_is_one_declaration_and_one_registry_line(
    tiny_dir, public_chats, expected, monkeypatch
):
    """A backend registered under a new name (the reference kernels with the padded fallback's growth rules) runs
    through Options and test_script's --attention alone: nothing else names it, and the output is the pipeline's."""
    from dataclasses import replace

    from orinfer import attention

    example = replace(attention.BACKENDS["reference"], name="example")
    monkeypatch.setitem(attention.BACKENDS, "example", example)  # the registry line
    gen = generator(tiny_dir, optimize.Options(attention="example"))
    assert gen.engine.runner.backend is example and gen.describe().startswith(
        "attention: example backend"
    )
    assert (
        gen(public_chats, max_new_tokens=NEW, return_full_text=False)
        == expected[: len(public_chats)]
    )


@pytest.fixture
def paged_reference(monkeypatch):
    """The paged layout with the kernel's float32 reference (reference_paged) in place of the CUDA
    kernel, registered for the CPU; records each call's tiles."""
    from dataclasses import replace

    from orinfer import attention

    calls = []

    def kernel(q, k_rows, v_rows, tiles, tables, block_size, window, scale):
        calls.append(tiles.tolist())
        return reference_paged(q, k_rows, v_rows, tiles, tables, block_size, window, scale)

    backend = replace(attention.BACKENDS["paged"], name="paged-reference", devices=("cpu",),
                      kernels=lambda *shape: kernel, needs_cuda_extension=False)  # fmt: skip
    monkeypatch.setitem(attention.BACKENDS, backend.name, backend)
    return SimpleNamespace(attention=(backend.name, 0), calls=calls)


@pytest.mark.parametrize(
    "plan", [{}, {"max_batched_tokens": 48, "max_num_seqs": 4}, {"block_size": 4}]
)
def test_paged_layout_matches_pipeline(
    paged_reference, tiny_dir, public_chats, longest_chat, expected, plan
):
    """Whole prompts, shared prefixes, prompts prefilled in chunks behind their own cached tokens,
    drafts, blocks of several tokens: the paged layout's tiles and block tables give the pipeline's
    text (the kernel's reference in float32 reading the cache through them)."""
    gen = generator(tiny_dir, attention=paged_reference.attention, **plan)
    assert isinstance(gen.engine.runner.layouts[0], paged.PagedLayout)
    assert (
        gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False) == expected
    )
    layers = gen.engine.model.cfg.num_hidden_layers
    assert len(paged_reference.calls) == gen.engine.stats["passes"] * layers
    tiles = [t for call in paged_reference.calls for t in call]
    # tiles of 16 tokens at most, and some prompt chunks cut into several
    assert max(n for _, n, _, _ in tiles) == paged.TILE_TOKENS
    assert any(n > 1 for _, n, _, _ in tiles) and any(n == 1 for _, n, _, _ in tiles)


@pytest.mark.parametrize("window", [24, 50])
def test_paged_layout_applies_the_sliding_window(paged_reference, tmp_path, public_chats, window):
    folder = write_tiny_model(tmp_path, seed=1, std=0.1, sliding_window=window)
    chats = public_chats[:6]
    expected = reference(hf_pipeline(folder), chats, max_new_tokens=30, return_full_text=False)
    gen = generator(folder, attention=paged_reference.attention)
    assert gen(chats, max_new_tokens=30, return_full_text=False) == expected


def test_paged_layout_cuts_tiles_and_pads_as_the_padded_layout(paged_reference, tiny_dir):
    """An eager pass padded to a multiple of tokens, and decode steps padded to a graph's shape
    (one-token sequences at position 0 in the scratch block, as the padded layout pads): every new
    token in exactly one tile, in order."""
    gen = generator(tiny_dir, attention=paged_reference.attention, padding=(8, 16))
    runner = gen.engine.runner
    seqs = [
        Sequence(index=i, token_ids=list(range(100, 100 + n)), num_prompt_tokens=n,
                 max_new_tokens=1, block_table=list(range(1 + 40 * i, 41 + 40 * i)))
        for i, n in enumerate((37, 3))
    ]  # fmt: skip
    works = [Work(seq=s, tokens=s.token_ids[2:], start=2, wants_logits=True) for s in seqs]
    ids, ctx = runner.context(works)
    assert ids.numel() == 48  # 35 + 1 new tokens, padded to a multiple of 16
    tiles = ctx.layout.tiles.tolist()
    assert tiles[:4] == [[0, 16, 2, 0], [16, 16, 18, 0], [32, 3, 34, 0], [35, 1, 2, 1]]
    assert tiles[4:] == [[36 + i, 1, 0, 2 + i] for i in range(12)]
    assert ctx.layout.block_tables.shape[0] == 14
    # A graph's shape (sequences, blocks) fixes every per-pass tensor's: a replay copies them in.
    steps = [Work(seq=s, tokens=[5], start=n, wants_logits=True) for s, n in zip(seqs, (37, 3))]
    ids, ctx = runner.context(steps, shape=(8, 12))
    assert ctx.layout.tiles.tolist() == [[0, 1, 37, 0], [1, 1, 3, 1]] + [
        [i, 1, 0, i] for i in range(2, 8)
    ]
    assert ctx.layout.block_tables.shape == (8, 12) and ids.numel() == 8
