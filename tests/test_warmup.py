"""The warm-up meets every GEMM token count a pass can bring under the Orin's layout (the padded one, eager, passes
padded to multiples of 16 as on CUDA): the counts each linear layer sees in a run are among those it sees in
warmup.meet_gemm_kernels (cuBLAS picks a kernel by the exact count, and a kernel's first use stalls the host inside
the timed run)."""
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch.nn.functional as F
from conftest import generator

from orinfer.warmup import gemm_counts, meet_gemm_kernels


@contextmanager
def recorded_counts(monkeypatch):
    """Each GEMM's token counts (rows of its input), by its weight's shape (the layer's kind: qkv, o, gate, up,
    down, LM head): every product of the model goes through F.linear."""
    seen, linear = defaultdict(set), F.linear

    def recording(x, weight, *args, **kwargs):
        seen[tuple(weight.shape)].add(x.numel() // x.shape[-1])
        return linear(x, weight, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(F, "linear", recording)
        yield seen


def test_every_gemm_count_of_a_run_under_the_orin_layout_is_met_by_the_warm_up(tiny_dir, public_chats,
                                                                              longest_chat, monkeypatch):
    gen = generator(tiny_dir, padded_multiple=16, max_batched_tokens=1024, max_num_seqs=82)
    plan, model = gen.engine.plan, gen.model
    assert plan.mlp_rows == 256  # shared memory's plan: the MLP in 256-row parts, as on the Orin
    with recorded_counts(monkeypatch) as ran:
        gen(public_chats + [longest_chat] + public_chats[:5], max_new_tokens=24, return_full_text=False)
    with recorded_counts(monkeypatch) as met:
        meet_gemm_kernels(model, plan.max_batched_tokens, plan.max_num_seqs * (1 + plan.max_drafts),
                          gen.engine.runner.eager_padding)
    assert set(ran) == set(met) and max(len(counts) for counts in ran.values()) > 5
    for kind, counts in ran.items():
        assert counts <= met[kind], (kind, sorted(counts - met[kind]))


@pytest.mark.unit
def test_the_counts_cover_every_padded_pass_of_the_orin_plan():
    """1,024-token passes and up to 410 sampled rows (82 sequences x 5), padded to multiples of 16."""
    for most in (1024, 410):
        counts = set(gemm_counts(most, (0, 16)))
        assert {t + (-t % 16) for t in range(1, most + 1)} <= counts and len(counts) == -(-most // 16)
