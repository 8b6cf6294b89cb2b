"""The benchmark harness's own pieces, on the CPU: W1 is in the organisers' format, and the scripted-answer
LogitsProcessor makes transformers' pipeline say exactly the gold answers (as orinfer's script hook does)."""
import json
import sys

from conftest import ROOT, records

sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import optimize  # noqa: E402


def test_w1_records_are_in_the_organisers_format():
    # The organisers' 30 public records are OpenBookQA validation[0:30] in this very format.
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "openbookqa_validation_first30.jsonl").read_text().splitlines()]
    assert [bench.competition_record(r) for r in rows] == records("test_dataset.jsonl")


def test_scripted_answers_in_pipeline_and_in_orinfer(gen, hf, tmp_path):
    from transformers import LogitsProcessorList
    from transformers.pipelines.pt_utils import KeyDataset
    w1 = [json.loads(line) for line in bench.write_w1(tmp_path).read_text().splitlines()][:6]
    scripts = bench.answer_scripts(gen.tokenizer, w1)
    prompts = optimize.prompt_ids(gen.tokenizer, [r["message"] for r in w1])
    processor = bench.Scripted({tuple(p): s for p, s in zip(prompts, scripts)}, pad=32000)
    theirs = list(hf(KeyDataset(w1, "message"), max_new_tokens=50, return_full_text=False, do_sample=False,
                     logits_processor=LogitsProcessorList([processor])))
    ours = gen([r["message"] for r in w1], scripts=scripts, max_new_tokens=50, return_full_text=False)
    answers = [[{"generated_text": r["answer"]}] for r in w1]
    assert [[{"generated_text": o[0]["generated_text"].lstrip()}] for o in theirs] == answers
    assert [[{"generated_text": o[0]["generated_text"].lstrip()}] for o in ours] == answers
    assert bench.unique_prompt_tokens(prompts) < sum(map(len, prompts))  # the shared instruction counts once
    # Choice drafts: where the answer's first token begins no other choice, the pass after the prompt's verifies the
    # whole answer and samples <|end|> (never fed), so such a request takes exactly two passes; where it begins
    # several, that pass verifies their shared part and samples the deciding token: one pass more.
    picked = alike = 0
    for seq, script in zip(gen.last_sequences, scripts):
        beginning = [c for c in seq.candidates if c[:1] == script[:1]]
        if beginning == [script[:-1]]:
            picked += 1
            assert seq.passes == 2
        elif len(beginning) > 1 and script[:-1] in beginning:
            alike += 1
            assert seq.passes == 3
    assert picked >= 3 and alike >= 1


def test_breakdown_splits_host_and_device_idle():
    from types import SimpleNamespace
    # Three passes: the second launched ahead (host gap 0) but reaching the device 0.05 s after the first ended;
    # the third launched 0.02 s after the second's tokens were back.
    log = [(100, 2, 0.01, 0.30, False, 10.00, (0.00, 0.30)),
           (200, 3, 0.01, 0.55, False, 10.10, (0.35, 0.60)),
           (50, 1, 0.01, 0.10, True, 10.68, (0.62, 0.72))]
    gen = SimpleNamespace(engine=SimpleNamespace(runner=SimpleNamespace(pass_log=log)),
                          timings={"tokenize": 0.1, "detokenize": 0.01})
    b = bench.breakdown(gen, 0, started=9.97, seconds=0.83)
    assert b["device_idle_between_s"] == [0.05, 0.02]
    assert b["pass_device_s"] == [0.3, 0.25, 0.1] and abs(b["device_s"] - 0.65) < 1e-9
    assert b["between_passes_s"] == [0.0, 0.02]
    assert abs(b["before_first_pass_s"] - 0.03) < 1e-9 and abs(b["after_last_pass_s"] - 0.01) < 1e-9
    assert abs(b["outside_passes_s"] - 0.06) < 1e-9


def test_system_names_carry_their_knobs():
    assert bench.pass_tokens_of("ours_t24k_repeat") == 24576 and bench.pass_tokens_of("ours_repeat") is None
    assert bench.packed_queries_of("ours_q64") == 64
    assert bench.packed_queries_of("ours_flash") == bench.PACKED_MAX_QUERIES == 128
