"""The warm-up meets every GEMM token count a pass can bring under the Orin's layout (the padded one, eager, no
graphs): the counts each linear layer sees in a run are among those it sees in warmup.meet_gemm_kernels (cuBLAS picks
a kernel by the exact count, and a kernel's first use stalls the host inside the timed run)."""

from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import generator

from orinfer.warmup import gemm_counts, meet_gemm_kernels


@contextmanager
def recorded_counts(monkeypatch, compute: bool = True):
    """Each GEMM's token counts (rows of its input), by its weight's shape (the layer's kind: qkv, o, gate, up,
    down, LM head): every product of the model goes through F.linear. `compute=False`: the products are not
    computed (uninitialised tensors of their shape), which the counts do not need."""
    seen, linear = defaultdict(set), F.linear

    def recording(x, weight, *args, **kwargs):
        seen[tuple(weight.shape)].add(x.numel() // x.shape[-1])
        if not compute:
            return x.new_empty(*x.shape[:-1], weight.shape[0])
        return linear(x, weight, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(F, "linear", recording)
        if not compute:  # nor the LM head's argmax over the vocabulary
            m.setattr(
                torch.Tensor,
                "argmax",
                lambda t, dim=None: t.new_zeros(t.shape[:-1], dtype=torch.long),
            )
        yield seen


def test_every_gemm_count_of_a_run_under_the_orin_layout_is_met_by_the_warm_up(
    tiny_dir, public_chats, longest_chat, monkeypatch
):
    """The Orin's plan: the padded layout, no graphs, passes of up to 1,024 tokens (any count: all met), the MLP in
    256-row parts, up to 82 sequences with drafts sampled."""
    gen = generator(tiny_dir, max_batched_tokens=1024, max_num_seqs=82)
    plan, model, runner = gen.engine.plan, gen.model, gen.engine.runner
    assert (
        plan.mlp_rows == 256 and runner.backend.name == "padded"
    )  # shared memory's plan, the padded layout, as on the Orin
    with recorded_counts(monkeypatch) as ran:
        gen(
            public_chats + [longest_chat] + public_chats[:5],
            max_new_tokens=24,
            return_full_text=False,
        )
    with recorded_counts(monkeypatch, compute=False) as met:
        meet_gemm_kernels(
            model,
            plan.max_batched_tokens,
            plan.max_num_seqs * (1 + plan.max_drafts),
            runner.eager_padding,
            every_small_count=True,
        )
    assert set(ran) == set(met) and max(len(counts) for counts in ran.values()) > 5
    for kind, counts in ran.items():
        assert counts <= met[kind], (kind, sorted(counts - met[kind]))


@pytest.mark.unit
def test_the_counts_cover_every_pass_of_the_orin_plan_and_the_padded_passes_above_it():
    counts = set(gemm_counts(1024, (1024, 64), every_small_count=True))
    assert set(range(1, 1025)) <= counts  # the Orin: every count of a pass up to 1,024 tokens
    big = set(gemm_counts(16384, (1024, 64), every_small_count=True))
    assert {t + (-t % 64) for t in range(1025, 16385)} <= big and len(big) < 1024 + 256 + 1
    ladder = set(
        gemm_counts(16384, (1024, 64))
    )  # graphs take the small passes: a ladder below 1,024
    assert len({c for c in ladder if c < 1024}) < 64
