"""Shared fixtures: tiny random Phi-3 folders, the bundled data, and transformers' pipeline as the oracle (fp32, CPU)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optimize  # noqa: E402
from orinfer import oracle  # noqa: E402
from orinfer.engine import Engine  # noqa: E402
from orinfer.observe import Observer  # noqa: E402
from orinfer.options import Options  # noqa: E402
from orinfer.runner import ModelRunner  # noqa: E402
from orinfer.tiny import write_tiny_model  # noqa: E402


def records(name: str) -> list[dict]:
    return [
        json.loads(line) for line in (ROOT / "data" / name).read_text().splitlines() if line.strip()
    ]


def scheduler(num_blocks: int = 256, **limits):
    """A Scheduler over `num_blocks` one-token cache blocks for the unit tests: 64 tokens a pass,
    1,024 gathered keys, end-of-turn id 0, and `limits` (scheduler.Limits' other fields)."""
    from orinfer.block_manager import BlockManager
    from orinfer.scheduler import Limits, Scheduler

    limits = {"max_batched_tokens": 64, "max_gather_tokens": 1024, **limits}
    return Scheduler(BlockManager(num_blocks, 1), Limits(**limits), eos_ids=[0])


@pytest.fixture(scope="session")
def public_chats():
    return [r["message"] for r in records("test_dataset.jsonl")]


@pytest.fixture(scope="session")
def longest_chat():
    return records("sample_longest_data.jsonl")[0]["message"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """std 0.1 spreads the logits well apart (no near-ties at fp32); end_boost makes some sequences say <|end|>."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0, std=0.1, end_boost=3.0)


def hf_pipeline(folder, attention: str | None = None):
    """transformers' pipeline at fp32 with transformers' Phi-3 and its default attention (SDPA in 5.x; eager in
    4.44.2, whose Phi-3 has no SDPA path), or `attention="eager"`, which the organisers' trust_remote_code=True load
    runs (the model folder's own modeling_phi3.py, eager attention, in transformers 4.44.2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    chosen = {"attn_implementation": attention} if attention else {}
    model = AutoModelForCausalLM.from_pretrained(
        folder, **chosen, **oracle.dtype_argument(torch.float32)
    )
    return pipeline(
        "text-generation",
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(folder),
        device="cpu",
    )


@pytest.fixture(scope="session")
def hf(tiny_dir):
    return hf_pipeline(tiny_dir)


# The most KV cache a test's inputs use at once (the public set and the longest sample with their answers: ~4.4k
# tokens): the pool all of a CPU's budget leaves would be gigabytes of zeros for each generator a test builds.
KV_TOKENS = 16384


def generator(
    folder,
    options: Options = Options(),
    attention: tuple[str, int] | None = None,
    padding: tuple[int, int] | None = None,
    observer: Observer | None = None,
    **plan_changes,
):
    """optimize.build on the CPU; optionally a hand-set memory plan (small caches, tiny passes...), an attention
    backend and its packed kernel's bound in place of the options' (the "reference" backend: the varlen layout with
    float32 kernels, as the CPU has no FlashAttention), the runner's padding of eager passes (above, multiple) and an
    observer."""
    if attention:
        options = replace(options, attention=attention[0], packed_queries=attention[1])
    gen = optimize.build(
        folder,
        device="cpu",
        options=options,
        progress=False,
        observer=observer,
        kv_tokens=KV_TOKENS,
    )
    if plan_changes or padding:
        e = gen.engine
        plan = replace(e.plan, **plan_changes)
        runner = (
            ModelRunner(
                e.model,
                plan.num_blocks,
                plan.block_size,
                e.runner.backend,
                e.runner.kernels,
                padding,
                max_gather_tokens=plan.max_gather_tokens,
            )
            if padding
            else None
        )
        gen.engine = Engine(
            e.model,
            e.eos_ids,
            plan,
            options,
            attention=(e.runner.backend, e.runner.kernels),
            runner=runner,
            observer=observer,
        )
    return gen


@pytest.fixture(scope="session")
def gen(tiny_dir):
    return generator(tiny_dir)


def reference(hf, inputs, **kw):
    """transformers' pipeline, one input at a time (its default), in input order."""
    kw.setdefault("do_sample", False)
    return [hf(x, **kw) for x in inputs]


NEW = 40  # new tokens in the exactness tests


@pytest.fixture(scope="session")
def expected(hf, public_chats, longest_chat):
    """The pipeline's answers to the 30 public items and the 868-token sample."""
    return reference(hf, public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False)
