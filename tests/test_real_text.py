"""Real text: a real trained model, SmolLM2-135M-Instruct in its own Llama layout (tests/real_model.py: head
dimension 64, 3 query heads a KV head, a 49,152-token vocabulary, tied embeddings, ChatML; and once in Phi-3's
layout), against transformers' pipeline (its LlamaForCausalLM for the folder) at fp32, string for string: the organisers' public set, more records in the competition's format, and free-form chats that invite long
and repetitive answers; with drafting off, at its defaults and forced on (lookup drafts every pass), with chained
decode passes, on the padded layout, the varlen/packed layouts and the paged layout (their float32 reference kernels:
this is the CPU), and through test_script.py end to end. Its answers are a real model's words, so drafts from the listed choices
and from lookups meet text that sometimes follows them and sometimes does not."""

import json
import sys

import pytest
from conftest import ROOT, hf_pipeline, reference, records
from real_model import smollm2
from test_attention import paged_reference, reference_packed_layout  # noqa: F401 (fixtures)

import optimize
import test_script
from orinfer.attention.reference import reference_packed, reference_varlen
from orinfer.options import Options

sys.path.insert(0, str(ROOT / "bench"))
from workload import competition_record  # noqa: E402

MC_NEW, CHAT_NEW = 32, 64  # new tokens: multiple-choice answers are short, the chats run long

CHATS = [
    [{"role": "user", "content": text}]
    for text in (
        "List the numbers from 1 to 40, separated by commas.",
        "Repeat the sentence 'the quick brown fox jumps over the lazy dog' five times.",
        "Write a short poem about the sea in which every line starts with 'The sea'.",
        "Explain step by step how to make a cup of tea.",
        "Write a Python function that returns the n-th Fibonacci number, and explain it.",
        "Count backwards from 30 to 1.",
    )
]


@pytest.fixture(scope="session")
def real_dir():
    return smollm2("llama")


@pytest.fixture(scope="session")
def mc_chats():
    """The public set and 8 OpenBookQA test items in the competition's format."""
    rows = [
        json.loads(line)
        for line in (ROOT / "bench" / "data" / "openbookqa_test.jsonl").read_text().splitlines()
    ]
    return [r["message"] for r in records("test_dataset.jsonl")] + [
        competition_record(r)["message"] for r in rows[:8]
    ]


@pytest.fixture(scope="session")
def real_hf(real_dir):
    return hf_pipeline(real_dir)


@pytest.fixture(scope="session")
def real_expected(real_hf, mc_chats):
    """The pipeline's answers: (multiple-choice records, chats)."""
    return (
        reference(real_hf, mc_chats, max_new_tokens=MC_NEW, return_full_text=False),
        reference(real_hf, CHATS, max_new_tokens=CHAT_NEW, return_full_text=False),
    )


def run(folder, mc_chats, options=Options(), attention=None):
    from conftest import generator

    gen = generator(folder, options, attention=attention)
    return (
        gen(mc_chats, max_new_tokens=MC_NEW, return_full_text=False),
        gen(CHATS, max_new_tokens=CHAT_NEW, return_full_text=False),
        gen.engine.stats,
    )


def test_the_model_is_real_and_its_answers_are_varied(real_hf, real_expected):
    """A trained model: it knows a capital, and its answers differ (random weights would babble alike)."""
    capital = real_hf(
        [{"role": "user", "content": "What is the capital of France?"}],
        max_new_tokens=20,
        return_full_text=False,
        do_sample=False,
    )[0]["generated_text"]
    assert "Paris" in capital
    mc, chats = real_expected
    assert len({o[0]["generated_text"] for o in mc}) > len(mc) // 2
    assert (
        "1, 2, 3" in chats[0][0]["generated_text"]
    )  # the list it was asked for: long and repetitive


@pytest.mark.parametrize(
    "name, options",
    [
        ("drafting off", Options(speculate=False)),
        ("defaults", Options()),
        ("lookup drafts every pass", Options(lookup_draft_tokens=1 << 20)),
    ],
)
def test_engine_equals_pipeline_on_real_text(real_dir, mc_chats, real_expected, name, options):
    mc, chats, stats = run(real_dir, mc_chats, options)
    assert (mc, chats) == real_expected
    assert stats["chained_passes"] > 0  # decode passes were chained to the pass in flight
    if options.lookup_draft_tokens:  # drafts really met real text: some kept, some not
        assert 0 < stats["accepted_drafts"] < stats["draft_tokens"]


def test_the_varlen_layout_with_the_packed_kernel_on_real_text(
    real_dir, mc_chats, real_expected, reference_packed_layout
):
    """Prompt chunks to FlashAttention's layout, decode steps and drafts to the packed kernel (float32 references of
    both: this is the CPU), on head dimension 64 and three query heads a KV head."""
    mc, chats, _ = run(
        real_dir, mc_chats, Options(lookup_draft_tokens=1 << 20), attention=reference_packed_layout
    )
    assert (mc, chats) == real_expected
    assert reference_varlen.calls > 0 and reference_packed.calls


def test_the_paged_layout_on_real_text(real_dir, mc_chats, real_expected, paged_reference):
    """The paged layout's tiles and block tables (the kernel's float32 reference reading the cache
    through them: this is the CPU), on head dimension 64 and three query heads a KV head, with
    lookup drafts every pass."""
    mc, chats, _ = run(
        real_dir,
        mc_chats,
        Options(lookup_draft_tokens=1 << 20),
        attention=paged_reference.attention,
    )
    assert (mc, chats) == real_expected
    assert paged_reference.calls


def test_test_script_end_to_end_on_real_text(real_dir, mc_chats, real_expected, tmp_path, capsys):
    data, out = tmp_path / "data.jsonl", tmp_path / "out.jsonl"
    data.write_text(
        "".join(json.dumps({"message": chat, "answer": "x"}) + "\n" for chat in mc_chats)
    )
    code = test_script.main(
        [
            "--model",
            str(real_dir),
            "--device",
            "cpu",
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-new-tokens",
            str(MC_NEW),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line)["output"] for line in out.read_text().splitlines()] == real_expected[0]


def test_the_phi3_layout_of_the_same_weights_runs_alike(real_dir, mc_chats, real_expected):
    """The same weights fused as a Phi-3 folder: the engine gives transformers' Llama text for it too."""
    folder = smollm2("phi3")
    mc, chats, _ = run(folder, mc_chats)
    assert (mc, chats) == real_expected


def test_the_folders_equal_transformers_own_gguf_reader(real_dir):
    """transformers' Llama read from the GGUF file, its Llama read from the written folder and its Phi-3 read from the
    fused one give the same logits (float32) and the same greedy tokens: the undone q/k permutation and the fused
    layout are right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from real_model import gguf_file

    from orinfer import oracle

    path, fp32 = gguf_file(), oracle.dtype_argument(torch.float32)
    try:
        gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **fp32)
        gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (
        ImportError,
        ValueError,
        NotImplementedError,
    ) as e:  # older transformers: no Q4_1, or no accelerate
        pytest.skip(
            f"this transformers cannot read the GGUF file ({type(e).__name__}: {str(e)[:120]})"
        )
    llama = AutoModelForCausalLM.from_pretrained(real_dir, **fp32)
    phi3 = AutoModelForCausalLM.from_pretrained(smollm2("phi3"), **fp32)
    tokenizer = AutoTokenizer.from_pretrained(real_dir)
    text = tokenizer.apply_chat_template(CHATS[3], tokenize=False, add_generation_prompt=True)
    text += "Numbers 12345, café 🙂"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert (
        ids.tolist()
        == gguf_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    )
    with torch.no_grad():
        theirs = gguf(ids).logits
        for model in (llama, phi3):
            assert torch.allclose(model(ids).logits, theirs, rtol=1e-5, atol=1e-4)
    tokens = gguf.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(llama.generate(ids, max_new_tokens=24, do_sample=False), tokens)
    assert torch.equal(phi3.generate(ids, max_new_tokens=24, do_sample=False), tokens)


def test_the_kv_pool_is_sized_to_the_run_on_the_cpu(real_dir):
    """--memory-budget auto on a 24 GiB machine once booked ~14 GiB of zero-filled cache for this model's whole run,
    which needs well under 1 GiB: the pool holds what the run's prompts and answers can use at once."""
    setup = optimize.prepare(real_dir, device="cpu")
    sized = setup.sized_for([200] * 40, 500)
    assert (
        sized.plan.kv_tokens == 40 * 700
        and sized.plan.sized_to_run
        and "sized to the run" in sized.plan.describe()
    )
    assert (
        sized.plan.kv_bytes == 40 * 700 * setup.cfg.kv_bytes_per_token * 2
    )  # float32: twice the bf16 figure
    assert (
        sized.plan.kv_bytes * 4 < setup.plan.kv_bytes
    )  # the whole budget's pool would be several times larger
