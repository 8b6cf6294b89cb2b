"""test_script.py end to end with --demo: the organisers' report, the outputs file, resume, and the fault table:
every bad input or option is one line on stderr naming the file and line (or the option), before the model loads,
with no traceback, a pre-existing --out left byte for byte as it was and nothing else left behind; a fault, a signal
or a second run during a run keeps every result, and nothing mixes one run's results with another's."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import optimize
import test_script
from orinfer.tiny import write_tiny_model


def run(capsys, *argv):
    assert test_script.main(["--demo", *argv]) == 0
    return capsys.readouterr().out


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "outs.jsonl"
    printed = run(capsys, "--out", str(out), "--max-new-tokens", "50")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(30))
    assert all(isinstance(r["output"][0]["generated_text"], str) for r in rows)
    # Section 4 as the organisers' script prints it: every answer, then the time and the score.
    answers = [r["output"][0]["generated_text"].lstrip().replace("\n", "") for r in rows]
    assert printed.splitlines() == [
        "===== Answers =====",
        *answers,
        "===== Perf result =====",
        printed.splitlines()[32],
        "Correctness: 0/30",
    ]  # random weights: nothing right
    assert printed.splitlines()[32].startswith("Elapsed_time:  ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "outs.jsonl"
    ]  # no journal, lock or temporary left


def test_resume_runs_only_the_missing_records(tmp_path, capsys):
    out = tmp_path / "outs.jsonl"
    run(capsys, "--out", str(out), "--max-new-tokens", "20")
    full = out.read_text().splitlines()
    out.write_text("\n".join(full[:12]) + "\n")  # as if the run had died after 12 results
    printed = run(capsys, "--out", str(out), "--max-new-tokens", "20", "--resume")
    assert "Elapsed_time (a resumed run, not a timing: 18 of 30 records ran in it): " in printed
    assert (
        "Elapsed_time: " not in printed
    )  # the timing run's line, which this must not be taken for
    assert out.read_text().splitlines() == full
    assert not out.with_name(
        out.name + ".partial"
    ).exists()  # the journal is gone once --out is whole


def test_scores_like_the_organisers(tmp_path, capsys, monkeypatch):
    """A record whose answer is the (nonsense) generated text, after lstrip and newline removal, counts as correct."""
    out = tmp_path / "outs.jsonl"
    run(capsys, "--out", str(out), "--max-new-tokens", "20")
    first = json.loads(out.read_text().splitlines()[1])["output"][0]["generated_text"]
    records = [
        json.loads(line) for line in (ROOT / "data" / "test_dataset.jsonl").read_text().splitlines()
    ]
    records[1]["answer"] = first.lstrip().replace("\n", "")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "Correctness: 1/30" in run(
        capsys, "--data", str(data), "--out", str(out), "--max-new-tokens", "20"
    )


GOOD = (ROOT / "data" / "test_dataset.jsonl").read_text().splitlines()


def chat(content, role="user") -> str:
    return json.dumps({"message": [{"role": role, "content": content}], "answer": "x"})


# (name, data file lines or bytes, extra options, what stderr's last line holds; "{data}" is the data file's path)
FAULTS = [
    (
        "content a number",
        [GOOD[0], chat(7)],
        [],
        "{data}:2: turn 1's 'content' must be a string, not a number",
    ),
    ("content null", [chat(None)], [], "{data}:1: turn 1's 'content' must be a string, not null"),
    (
        "ends with an assistant turn",
        [GOOD[0], GOOD[1], chat("hi", "assistant")],
        [],
        "{data}:3: the chat's last turn has role 'assistant'; it must end with a user turn",
    ),
    (
        "unknown role",
        [json.dumps({"message": [{"role": "tool", "content": "x"}]})],
        [],
        "{data}:1: turn 1 has role 'tool'",
    ),
    (
        "message not a list",
        [json.dumps({"message": "hello"})],
        [],
        "{data}:1: 'message' must be a non-empty list",
    ),
    (
        "message empty",
        [json.dumps({"message": []})],
        [],
        "{data}:1: 'message' must be a non-empty list",
    ),
    ("no message", [GOOD[0], '{"answer": "x"}'], [], "{data}:2: the record has no 'message'"),
    (
        "record not an object",
        [GOOD[0], "[1, 2]"],
        [],
        "{data}:2: a record must be a JSON object, not a list",
    ),
    (
        "array of non-records",
        ["[1, 2]"],
        [],
        "{data}:1: a record must be a JSON object, not a number",
    ),
    (
        "lone surrogate",
        [GOOD[0], '{"message": [{"role": "user", "content": "\\udc80"}]}'],
        [],
        "{data}:2: turn 1's 'content' holds a lone surrogate",
    ),
    (
        "answer not a string",
        [json.dumps({"message": [{"role": "user", "content": "q"}], "answer": 3})],
        [],
        "{data}:1: 'answer' must be a string, not a number",
    ),
    ("invalid JSON", [GOOD[0], "{not json"], [], "{data}:2: not valid JSON"),
    (
        "non-UTF-8 byte",
        (GOOD[0] + "\n" + GOOD[1] + "\n").encode() + b'{"message": "\xff"}\n',
        [],
        "{data}:3: not UTF-8 (byte 0xff at column 14)",
    ),
    ("empty file", [], [], "{data}: holds no records"),
    ("blank lines only", ["", "  ", ""], [], "{data}: holds no records"),
    ("missing data file", None, [], "{data}: no such file"),
    ("data is a folder", "folder", [], "{data}: is a directory"),
    (
        "max-new-tokens 0",
        [GOOD[0]],
        ["--max-new-tokens", "0"],
        "argument --max-new-tokens: expected a whole number >= 1, got 0",
    ),
    (
        "max-new-tokens text",
        [GOOD[0]],
        ["--max-new-tokens", "many"],
        "argument --max-new-tokens: expected a whole number",
    ),
    (
        "memory-budget banana",
        [GOOD[0]],
        ["--memory-budget", "banana"],
        "--memory-budget 'banana': expected a positive",
    ),
    (
        "memory-budget inf",
        [GOOD[0]],
        ["--memory-budget", "inf"],
        "--memory-budget 'inf': expected a positive",
    ),
    (
        "memory-budget nan",
        [GOOD[0]],
        ["--memory-budget", "nanGiB"],
        "--memory-budget 'nanGiB': expected a positive",
    ),
    (
        "memory-budget negative",
        [GOOD[0]],
        ["--memory-budget=-2GiB"],
        "--memory-budget '-2GiB': expected a positive",
    ),
    (
        "memory-budget zero",
        [GOOD[0]],
        ["--memory-budget", "0"],
        "--memory-budget '0': expected a positive",
    ),
    (
        "memory-budget absurd",
        [GOOD[0]],
        ["--memory-budget", "1e30"],
        "is more than this machine has",
    ),
    (
        "memory-budget 1MiB",
        [GOOD[0]],
        ["--memory-budget", "1MiB"],
        "memory budget 0.00 GiB leaves 0 tokens",
    ),
    (
        "unknown device",
        [GOOD[0]],
        ["--device", "tpu"],
        "device 'tpu': expected cpu, cuda or cuda:N",
    ),
    ("unknown dtype", [GOOD[0]], ["--dtype", "int8"], "argument --dtype: invalid choice"),
    (
        "unknown attention",
        [GOOD[0]],
        ["--attention", "flashinfer"],
        "attention backend 'flashinfer' is unknown; choose among varlen, paged, padded, reference",
    ),
    (
        "attention not on the cpu",
        [GOOD[0]],
        ["--attention", "varlen", "--device", "cpu"],
        "attention backend 'varlen' runs on cuda, not cpu",
    ),
    (
        "out folder missing",
        [GOOD[0]],
        ["--out", "{tmp}/no/such/out.jsonl"],
        "cannot be written: the folder",
    ),
    ("out a folder", [GOOD[0]], ["--out", "{tmp}"], "is a directory: --out must name a file"),
    ("out the data file", [GOOD[0]], ["--out", "{data}"], "is the data file"),
    (
        "out the data file by another spelling",
        [GOOD[0]],
        ["--out", "{tmp}/./data.jsonl"],
        "is the data file",
    ),
    ("data a pipe", "fifo", [], "{data}: is not a regular file"),
    (
        "nested too deeply",
        [GOOD[0], "[" * 100000 + "]" * 100000],
        [],
        "{data}:2: not a record: JSON nested too deeply",
    ),
    (
        "a 5,000-digit number",
        [GOOD[0], '{"message": ' + "9" * 5000 + "}"],
        [],
        "{data}:2: not a record: it holds a number of more digits than the decoder converts",
    ),
    ("out empty", [GOOD[0]], ["--out", ""], "'': names a folder, not a file"),
    ("out .", [GOOD[0]], ["--out", "."], ".: names a folder, not a file"),
    ("out ./", [GOOD[0]], ["--out", "./"], "./: names a folder, not a file"),
    ("out /", [GOOD[0]], ["--out", "/"], "/: names a folder, not a file"),
    ("out a device", [GOOD[0]], ["--out", "/dev/null"], "/dev/null: is not a regular file"),
    ("out a link to a device", [GOOD[0]], ["--out", "{tmp}/to-stdout"], "to-stdout: is a link to "),
    ("out a dangling link", [GOOD[0]], ["--out", "{tmp}/dangling"], "which is not a regular file"),
    (
        "journal a link",
        [GOOD[0]],
        ["--out", "{tmp}/linked.jsonl"],
        "linked.jsonl.partial: is not a regular file",
    ),
]
if not torch.cuda.is_available():
    FAULTS.append(
        ("cuda without CUDA", [GOOD[0]], ["--device", "cuda"], "device 'cuda': this torch")
    )


@pytest.fixture(scope="module")
def weightless(tmp_path_factory):
    """A model folder without weights: a run that got as far as loading them would fail there, with another
    message and exit code 1, so every fault of the table below is caught before the load."""
    folder = write_tiny_model(tmp_path_factory.mktemp("weightless"))
    (folder / "model.safetensors").unlink()
    return folder


@dataclass(frozen=True)
class Reshaped(optimize.Setup):
    """A set-up as optimize.prepare makes it, its memory plan changed (before the run's prompts are checked against
    it, or only after: then the check passes and the run meets the smaller cache), or its generator wrapped."""

    changes: tuple = ()
    before_check: bool = True
    wrap: object = None

    def sized_for(self, lengths, max_new_tokens):
        sized = super().sized_for(lengths, max_new_tokens)
        return replace(sized, plan=replace(sized.plan, **dict(self.changes)))

    def load(self, *args, **kwargs):
        gen = super().load(*args, **kwargs)
        return self.wrap(gen) if self.wrap else gen


def reshaped(plan_changes=None, wrap=None, before_check=True):
    def prepare(*args, **kwargs):
        setup = optimize.prepare(*args, **kwargs)
        changes = tuple((plan_changes or {}).items())
        plan = replace(setup.plan, **dict(changes)) if before_check else setup.plan
        return Reshaped(
            **{f.name: getattr(setup, f.name) for f in fields(setup)} | {"plan": plan},
            changes=changes,
            before_check=before_check,
            wrap=wrap,
        )

    return prepare


def previous_out(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"index": 0, "output": [{"generated_text": "from an earlier run"}]}\n')
    return out, out.read_bytes()


def assert_one_line_error(capsys, code, expected_code, expected) -> str:
    """The exit code, no traceback, and `expected` in stderr's last line, which is returned."""
    captured = capsys.readouterr()
    assert code == expected_code
    assert "Traceback" not in captured.err + captured.out
    last = captured.err.strip().splitlines()[-1]
    assert expected in last
    return last


@pytest.mark.parametrize("name, lines, options, message", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_table(tmp_path, capsys, weightless, name, lines, options, message):
    data = tmp_path / "data.jsonl"
    if lines == "folder":
        data.mkdir()
    elif lines == "fifo":
        os.mkfifo(data)  # nobody writes it: reading it would block
    elif isinstance(lines, bytes):
        data.write_bytes(lines)
    elif lines is not None:
        data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out, before = previous_out(tmp_path)
    (tmp_path / "to-stdout").symlink_to("/dev/stdout")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing-here")
    (tmp_path / "linked.jsonl.partial").symlink_to(out)
    data_before = data.read_bytes() if data.is_file() else None
    files = sorted(tmp_path.iterdir())
    options = [o.replace("{tmp}", str(tmp_path)).replace("{data}", str(data)) for o in options]
    try:
        code = test_script.main(
            [
                "--model",
                str(weightless),
                "--device",
                "cpu",
                "--data",
                str(data),
                "--out",
                str(out),
                *options,
            ]
        )
    except SystemExit as e:  # argparse's own exit, one line
        code = e.code
    assert_one_line_error(capsys, code, 2, message.replace("{data}", str(data)))
    assert out.read_bytes() == before
    assert (data.read_bytes() if data.is_file() else None) == data_before
    assert sorted(tmp_path.iterdir()) == files  # nothing left behind: no journal, lock or temporary


def test_prompt_larger_than_the_kv_cache_is_refused_before_the_load(tmp_path, capsys, weightless):
    data = tmp_path / "data.jsonl"
    longest = (ROOT / "data" / "sample_longest_data.jsonl").read_text().strip()
    data.write_text(GOOD[0] + "\n" + longest + "\n")
    out, before = previous_out(tmp_path)
    code = test_script.main(
        ["--model", str(weightless), "--device", "cpu", "--data", str(data), "--out", str(out)],
        prepare=reshaped(plan_changes={"num_blocks": 301}),
    )
    line = assert_one_line_error(
        capsys,
        code,
        2,
        f"{data}:2: the prompt's 868 tokens and up to 500 new tokens need "
        "1368 tokens of KV cache, and the memory budget",
    )
    assert "leaves 300: pass --memory-budget " in line and line.endswith(
        "GiB or more, or lower --max-new-tokens"
    )
    assert out.read_bytes() == before


def test_an_interrupted_journal_is_not_overwritten_without_resume(tmp_path, capsys, weightless):
    out, before = previous_out(tmp_path)
    journal = out.with_name(out.name + ".partial")
    journal.write_text('{"index": 3, "output": [{"generated_text": "kept"}]}\n')
    code = test_script.main(["--model", str(weightless), "--device", "cpu", "--out", str(out)])
    assert_one_line_error(
        capsys, code, 2, f"{journal}: holds the results of an interrupted run: pass --resume"
    )
    assert out.read_bytes() == before and "kept" in journal.read_text()


def test_the_command_line_prints_one_line(tmp_path):
    """The real process: exit code 2 and one line on stderr, as a user sees it."""
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "test_script.py"),
            "--demo",
            "--data",
            str(tmp_path / "none.jsonl"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert (
        run.returncode == 2
        and run.stderr == f"{tmp_path / 'none.jsonl'}: no such file\n"
        and not run.stdout
    )


class DiesAfter(optimize.Generator):
    """The engine dies, the user presses Ctrl-C or the system sends SIGTERM once `results` results are on disk."""

    def __init__(self, gen, results: int, error):
        super().__init__(gen.engine, gen.tokenizer, gen.progress)
        self.results, self.error = results, error

    def __call__(self, inputs, on_result=None, **kwargs):
        if on_result is None:  # the warm-up's call
            return super().__call__(inputs, **kwargs)
        done = []

        def result(i, output):
            on_result(i, output)
            done.append(i)
            if len(done) >= self.results:
                if isinstance(self.error, BaseException):
                    raise self.error
                os.kill(
                    os.getpid(), self.error
                )  # a real signal: its handler raises on the next bytecode

        return super().__call__(inputs, on_result=result, **kwargs)


@pytest.mark.parametrize(
    "error, code, message",
    [
        (RuntimeError("device lost"), 1, "error: RuntimeError: device lost (traceback in "),
        (KeyboardInterrupt(), 130, "interrupted: 7 results are kept in "),
        (signal.SIGINT, 130, "interrupted: 7 results are kept in "),
        (signal.SIGTERM, 143, "terminated: 7 results are kept in "),
    ],
)
def test_a_crash_keeps_the_previous_out_and_every_finished_result(
    tmp_path, capsys, error, code, message
):
    clean = tmp_path / "clean.jsonl"
    run(capsys, "--out", str(clean), "--max-new-tokens", "20")
    out, before = previous_out(tmp_path)
    dies = reshaped(wrap=lambda gen: DiesAfter(gen, 7, error))
    assert_one_line_error(
        capsys,
        test_script.main(["--demo", "--out", str(out), "--max-new-tokens", "20"], prepare=dies),
        code,
        message,
    )
    journal = out.with_name(out.name + ".partial")
    assert out.read_bytes() == before  # the old results survive until a whole new set replaces them
    assert len(journal.read_text().splitlines()) == 7
    assert not out.with_name(out.name + ".lock").exists()
    # The earlier --out holds another run's result: --resume refuses to mix it in, and keeps the journal.
    assert_one_line_error(
        capsys,
        test_script.main(["--demo", "--out", str(out), "--max-new-tokens", "20", "--resume"]),
        2,
        f"{out}:1: the result for record 0 was made for another record",
    )
    assert len(journal.read_text().splitlines()) == 7
    out.unlink()  # the user lets the earlier results go
    printed = run(capsys, "--out", str(out), "--max-new-tokens", "20", "--resume")
    assert "7 of 30 records" not in printed and "23 of 30 records ran in it" in printed
    assert out.read_text() == clean.read_text()


def test_a_second_interrupt_while_the_first_is_handled_is_ignored(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    close = test_script.Results.close

    def close_under_a_second_ctrl_c(self):
        os.kill(os.getpid(), signal.SIGINT)
        close(self)

    monkeypatch.setattr(test_script.Results, "close", close_under_a_second_ctrl_c)
    code = test_script.main(
        ["--demo", "--out", str(out), "--max-new-tokens", "20"],
        prepare=reshaped(wrap=lambda gen: DiesAfter(gen, 5, signal.SIGINT)),
    )
    assert_one_line_error(capsys, code, 130, "interrupted: 5 results are kept in ")
    assert len(out.with_name(out.name + ".partial").read_text().splitlines()) == 5


def test_resume_refuses_the_results_of_other_data_with_as_many_records(tmp_path, capsys):
    out, other = tmp_path / "out.jsonl", tmp_path / "other.jsonl"
    records = [json.loads(line) for line in GOOD]
    for r in records:
        r["message"][0]["content"] = r["message"][0]["content"].replace(
            "question:", "question (other):"
        )
    other.write_text("".join(json.dumps(r) + "\n" for r in records))
    run(capsys, "--data", str(other), "--out", str(out), "--max-new-tokens", "5")
    before = out.read_bytes()
    code = test_script.main(["--demo", "--out", str(out), "--max-new-tokens", "5", "--resume"])
    assert_one_line_error(
        capsys, code, 2, f"{out}:1: the result for record 0 was made for another record"
    )
    assert out.read_bytes() == before
    code = test_script.main(
        ["--demo", "--data", str(other), "--out", str(out), "--max-new-tokens", "6", "--resume"]
    )
    assert_one_line_error(
        capsys, code, 2, f"{out}:1: the result was made with another max_new_tokens"
    )


def test_a_second_run_on_the_same_out_is_refused_at_once(tmp_path, capsys):
    from orinfer.runfiles import RunLock

    out, before = previous_out(tmp_path)
    first = RunLock(out)
    first.acquire()
    try:
        code = test_script.main(["--demo", "--out", str(out)])
    finally:
        first.release()
    assert_one_line_error(
        capsys, code, 2, f"{out}: is in use by another run (pid {os.getpid()} on "
    )
    assert out.read_bytes() == before


def test_a_json_array_file_and_records_without_answers(tmp_path, capsys):
    data, out = tmp_path / "data.json", tmp_path / "out.jsonl"
    records = [json.loads(line) for line in GOOD[:4]]
    del records[1]["answer"], records[3]["answer"]
    data.write_text(json.dumps(records, indent=2))
    printed = run(capsys, "--data", str(data), "--out", str(out), "--max-new-tokens", "5")
    assert len(out.read_text().splitlines()) == 4
    assert "Correctness: 0/4" in printed
    assert (
        printed.splitlines()[-1]
        == "(2 of the 4 records have no 'answer' to score against: counted as not correct)"
    )


def test_help_answers_at_once_without_torch():
    code = (
        "import sys; sys.argv = ['test_script.py', '--help']; sys.path.insert(0, %r); import test_script\n"
        "try:\n    test_script.main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules" % str(ROOT)
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    for option in (
        "--model",
        "--data",
        "--out",
        "--resume",
        "--max-new-tokens",
        "--dtype",
        "--memory-budget",
        "--device",
        "--no-speculation",
        "--no-cuda-graphs",
        "--no-compile",
        "--no-cuda-extension",
        "--demo",
    ):
        assert option in shown.stdout
    assert "cuda:N" in shown.stdout and "(default: 500)" in shown.stdout
    assert all(f"  {code}  " in shown.stdout for code in ("0", "1", "2", "130"))


def test_resume_ignores_a_cut_last_line(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    run(capsys, "--out", str(out), "--max-new-tokens", "20")
    full = out.read_text()
    lines = full.splitlines()
    out.write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])  # the run died while writing line 6
    code = test_script.main(["--demo", "--out", str(out), "--max-new-tokens", "20", "--resume"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert (
        f"{out}:6: the last line is incomplete" in captured.err
        and "25 of 30 records ran in it" in captured.out
    )
    assert out.read_text() == full


def test_records_that_outgrow_the_cache_are_named_and_the_others_kept(tmp_path, capsys):
    out, data = tmp_path / "out.jsonl", ROOT / "data" / "test_dataset.jsonl"
    code = test_script.main(
        ["--demo", "--data", str(data), "--out", str(out), "--max-new-tokens", "100"],
        prepare=reshaped(plan_changes={"num_blocks": 157}, before_check=False),
    )
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    named = [line for line in captured.err.splitlines() if line.startswith(f"{data}:")]
    assert named and all(
        "no result: after " in line and "no longer fit the KV cache (156 tokens" in line
        for line in named
    )
    assert "records have no result" in captured.err.strip().splitlines()[-1]
    kept = [json.loads(line)["index"] for line in out.read_text().splitlines()]
    assert len(kept) + len(named) == 30 and kept == sorted(kept)


def _truncate(folder, keep):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: keep(path.stat().st_size)])


def _replace_header(folder, length: int, header: bytes):
    path = folder / "model.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + header + path.read_bytes()[8:])


# (name, what is done to a whole tiny model folder, what stderr's last line holds; "{m}" is the folder)
MODEL_FAULTS = [
    (
        "checkpoint truncated",
        lambda m: _truncate(m, lambda n: n - 1000),
        "{m}/model.safetensors: is {size} bytes but its header describes",
    ),
    (
        "checkpoint of 5 bytes",
        lambda m: _truncate(m, lambda n: 5),
        "{m}/model.safetensors: is 5 bytes, truncated",
    ),
    (
        "absurd header length",
        lambda m: _replace_header(m, 2**62, b""),
        "its header claims 4611686018427387904 bytes",
    ),
    (
        "corrupt header",
        lambda m: _replace_header(m, 20, b"{not a json table!!}"),
        "{m}/model.safetensors: its header is not a JSON table of tensors",
    ),
    (
        "shard named by the index missing",
        lambda m: (m / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
        ),
        "{m}/model.safetensors.index.json: names shards that are not in the folder: model-00002-of-00002.safetensors",
    ),
    (
        "no tokenizer",
        lambda m: [(m / n).unlink() for n in ("tokenizer.json", "tokenizer.model")],
        "{m}: no tokenizer (tokenizer.json or tokenizer.model",
    ),
    (
        "garbage config",
        lambda m: (m / "config.json").write_text("{\\x00 garbage"),
        "{m}/config.json: not valid JSON",
    ),
    (
        "config not an object",
        lambda m: (m / "config.json").write_text("[1]"),
        "{m}/config.json: not a JSON object",
    ),
    (
        "config without a field",
        lambda m: (m / "config.json").write_text(
            json.dumps(
                {
                    k: v
                    for k, v in json.loads((m / "config.json").read_text()).items()
                    if k != "hidden_size"
                }
            )
        ),
        "{m}/config.json: has no 'hidden_size'",
    ),
    (
        "garbage generation config",
        lambda m: (m / "generation_config.json").write_text("eos?"),
        "{m}/generation_config.json: not valid JSON",
    ),
    (
        "eos not a token id",
        lambda m: (m / "generation_config.json").write_text('{"eos_token_id": "end"}'),
        "{m}/generation_config.json: eos_token_id must be a token id",
    ),
]


@pytest.mark.parametrize("name, damage, message", MODEL_FAULTS, ids=[f[0] for f in MODEL_FAULTS])
def test_a_model_folder_that_is_not_whole_is_refused_before_the_load(
    tmp_path, capsys, name, damage, message
):
    """Checked before any weight loads (a truncated checkpoint once hung the load at 100 % CPU): exit 2, one line
    naming the file, nothing written."""
    model = write_tiny_model(tmp_path / "model")
    size = (model / "model.safetensors").stat().st_size
    damage(model)
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD[0] + "\n")
    out, before = previous_out(tmp_path)
    files = sorted(tmp_path.iterdir())
    code = test_script.main(
        ["--model", str(model), "--device", "cpu", "--data", str(data), "--out", str(out)]
    )
    assert_one_line_error(capsys, code, 2, message.format(m=model, size=size - 1000))
    assert out.read_bytes() == before and sorted(tmp_path.iterdir()) == files


def test_a_damaged_demo_cache_is_rebuilt(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out.jsonl"
    run(capsys, "--out", str(out), "--max-new-tokens", "5")
    first = out.read_text()
    weights = tmp_path / "cache" / "orinfer" / "tiny-random-phi3-v1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert test_script.main(["--demo", "--out", str(out), "--max-new-tokens", "5"]) == 0
    assert "the cached demo model is damaged: building it again" in capsys.readouterr().err
    assert out.read_text() == first


@pytest.mark.parametrize(
    "change, differs",
    [
        ("weights", "weights"),
        ("chat template", "chat template"),
        ("tokenizer", "chat template, tokenizer"),
    ],
)
def test_resume_refuses_results_of_another_model_with_the_same_config(
    tmp_path, capsys, change, differs
):
    """Another folder whose config.json is the same: other weights, another chat template or tokenizer."""
    one = write_tiny_model(tmp_path / "one", seed=0)
    two = write_tiny_model(tmp_path / "two", seed=1 if change == "weights" else 0)
    if change != "weights":
        config = json.loads((two / "tokenizer_config.json").read_text())
        config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        if change == "tokenizer":
            config["model_max_length"] = 1234
            del config["chat_template"]
            (two / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
        (two / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out.jsonl"
    common = ["--device", "cpu", "--out", str(out), "--max-new-tokens", "5"]
    assert test_script.main(["--model", str(one), *common]) == 0
    out.write_text("\n".join(out.read_text().splitlines()[:12]) + "\n")
    capsys.readouterr()
    code = test_script.main(["--model", str(two), *common, "--resume"])
    assert_one_line_error(
        capsys, code, 2, f"{out}:1: the result was made with another {differs}: pass another --out"
    )


def test_a_data_file_replaced_while_the_run_sets_up_is_refused(tmp_path, capsys):
    data, out = tmp_path / "data.jsonl", tmp_path / "out.jsonl"
    data.write_text("\n".join(GOOD) + "\n")
    other = [json.loads(line) for line in GOOD]
    for r in other:
        r["message"][0]["content"] += " (changed)"

    def replace_the_data(gen):
        data.write_text("".join(json.dumps(r) + "\n" for r in other))
        return gen

    code = test_script.main(
        ["--demo", "--data", str(data), "--out", str(out), "--max-new-tokens", "5"],
        prepare=reshaped(wrap=replace_the_data),
    )
    assert_one_line_error(
        capsys, code, 2, f"{data}: changed since it was checked before the model loaded"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


class FullDisk(optimize.Generator):
    """The disk fills after `results` results: the next line is cut inside a two-byte character."""

    def __init__(self, gen, results: int, journal: Path):
        super().__init__(gen.engine, gen.tokenizer, gen.progress)
        self.results, self.journal = results, journal

    def __call__(self, inputs, on_result=None, **kwargs):
        if on_result is None:
            return super().__call__(inputs, **kwargs)
        done = []

        def result(i, output):
            if len(done) == self.results:
                with open(self.journal, "ab") as f:
                    f.write('{"index": 9, "output": [{"generated_text": "é'.encode()[:-1])
                raise OSError(errno.ENOSPC, "No space left on device", str(self.journal))
            on_result(i, output)
            done.append(i)

        return super().__call__(inputs, on_result=result, **kwargs)


def test_a_full_disk_keeps_the_results_says_so_and_releases_the_lock(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    journal = out.with_name(out.name + ".partial")
    code = test_script.main(
        ["--demo", "--out", str(out), "--max-new-tokens", "20"],
        prepare=reshaped(wrap=lambda gen: FullDisk(gen, 9, journal)),
    )
    line = assert_one_line_error(capsys, code, 1, "error: no space left on the disk (")
    assert f"9 results are kept in {journal}" in line and "run again with --resume" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [journal.name]  # no lock, no empty log
    # The cut line ends inside a character: --resume excuses it and runs the rest.
    printed = run(capsys, "--out", str(out), "--max-new-tokens", "20", "--resume")
    assert "21 of 30 records ran in it" in printed


def test_a_crash_while_resume_rewrites_the_journal_keeps_every_result(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out.jsonl"
    code = test_script.main(
        ["--demo", "--out", str(out), "--max-new-tokens", "20"],
        prepare=reshaped(wrap=lambda gen: DiesAfter(gen, 9, KeyboardInterrupt())),
    )
    journal = out.with_name(out.name + ".partial")
    kept = journal.read_bytes()
    assert code == 130 and len(kept.splitlines()) == 9

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)  # the rewrite dies before its new file is in place
    code = test_script.main(["--demo", "--out", str(out), "--max-new-tokens", "20", "--resume"])
    assert_one_line_error(capsys, code, 130, "interrupted: 9 results are kept in ")
    assert journal.read_bytes() == kept and sorted(p.name for p in tmp_path.iterdir()) == [
        journal.name
    ]


def test_a_json_array_of_100000_records_is_read_in_linear_time(tmp_path):
    from orinfer.dataset import read_dataset

    data = tmp_path / "data.json"
    record = json.loads(GOOD[0])
    data.write_text("[\n" + ",\n".join(json.dumps(record) for _ in range(100000)) + "\n]\n")
    start = time.perf_counter()
    read = read_dataset(data)
    assert len(read.records) == 100000 and read.lines[-1] == 100001
    assert (
        time.perf_counter() - start < 30
    )  # 1.3 s on a 2-core machine; quadratic parsing took 49 s


def test_the_self_checks_inputs_are_checked_as_a_runs_and_it_writes_nothing(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for data, message in (
        (fifo, f"{fifo}: is not a regular file"),
        ("/dev/zero", "/dev/zero: is not a regular file"),
    ):
        code = test_script.main(["--self-check", "--demo", "--data", str(data)])
        assert_one_line_error(capsys, code, 2, message)
    for extra, option in ((["--out", "x.jsonl"], "--out"), (["--resume"], "--resume")):
        with pytest.raises(SystemExit) as e:
            test_script.main(["--self-check", "--demo", *extra])
        assert_one_line_error(
            capsys, e.value.code, 2, f"argument {option}: --self-check writes no results"
        )
    with pytest.raises(SystemExit) as e:
        test_script.main(["--demo", "--model", str(tmp_path)])
    assert_one_line_error(
        capsys, e.value.code, 2, "argument --model: --demo runs the embedded tiny model"
    )


def test_a_fault_in_the_self_check_writes_nothing_beside_the_users_files(
    tmp_path, capsys, monkeypatch
):
    from orinfer import selfcheck

    def broken(*args, **kwargs):
        raise RuntimeError("a fault inside the self-check")

    monkeypatch.setattr(selfcheck, "run", broken)
    monkeypatch.chdir(tmp_path)
    code = test_script.main(
        ["--self-check", "--demo", "--data", str(ROOT / "data" / "test_dataset.jsonl")]
    )
    last = assert_one_line_error(
        capsys, code, 1, "error: RuntimeError: a fault inside the self-check (traceback in "
    )
    assert list(tmp_path.iterdir()) == []
    Path(last.split("traceback in ")[1].split(")")[0]).unlink()


def test_a_prompt_the_budget_cannot_attend_over_is_refused_before_it_costs_memory(tmp_path):
    """A fresh process, as a user runs it (the budget counts the process's own memory: a test runner's would not
    leave the 3 GiB the demo's cache needs)."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"message": [{"role": "user", "content": "word " * 200000}]}) + "\n")
    run = _command(
        tmp_path,
        "--demo",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--memory-budget",
        "3GiB",
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"{data}:1: the prompt's 200004 tokens and up to 500 new "
            "tokens need 200504 tokens of KV cache"
        )
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_an_out_link_to_a_file_is_written_through(tmp_path, capsys):
    target, link = tmp_path / "elsewhere" / "results.jsonl", tmp_path / "out.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link.symlink_to(target)
    run(capsys, "--out", str(link), "--max-new-tokens", "5")
    assert link.is_symlink() and len(target.read_text().splitlines()) == 30


def _command(tmp_path, *argv, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, str(ROOT / "test_script.py"), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        timeout=600,
        **kwargs,
    )


@pytest.mark.parametrize("home", ["a file", "read-only"])
def test_a_home_the_demo_cannot_use_is_one_line(tmp_path, home):
    path = tmp_path / "home"
    if home == "a file":
        path.write_text("")
    else:
        path.mkdir()
        path.chmod(0o500)
    run = _command(
        tmp_path,
        "--demo",
        "--data",
        str(ROOT / "data" / "test_dataset.jsonl"),
        env={"HOME": str(path), "XDG_CACHE_HOME": "", "HF_HOME": str(tmp_path / "hf")},
    )
    if home == "read-only" and os.geteuid() == 0:  # root writes anyway: the run simply works
        assert run.returncode == 0, run.stderr
        return
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "the demo model cannot be built in " in run.stderr and "set XDG_CACHE_HOME" in run.stderr


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT])
def test_hangup_and_quit_end_the_run_as_sigterm_does(tmp_path, capsys, signum):
    out = tmp_path / "out.jsonl"
    code = test_script.main(
        ["--demo", "--out", str(out), "--max-new-tokens", "20"],
        prepare=reshaped(wrap=lambda gen: DiesAfter(gen, 4, signum)),
    )
    assert_one_line_error(
        capsys,
        code,
        128 + signum,
        f"terminated by {signal.Signals(signum).name}: 4 results are kept",
    )
    assert not out.with_name(out.name + ".lock").exists()


def test_the_report_is_printed_in_any_encoding(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"message": [{"role": "user", "content": "x"}], "answer": "é"}) + "\n"
    )
    run = _command(
        tmp_path,
        "--demo",
        "--data",
        str(data),
        "--max-new-tokens",
        "30",
        env={"PYTHONIOENCODING": "ascii"},
    )
    assert run.returncode == 0, run.stderr
    assert "Correctness: 0/1" in run.stdout


def test_section_3_runs_what_its_own_read_gives_and_the_check_leaves_nothing_warm(
    tmp_path, capsys, monkeypatch
):
    """Nothing built from the read before the clock reaches Section 3: the chats the generator gets are the very
    objects of Section 3's own read of the file, and the file's pages were dropped from the page cache before it."""
    reads, given, dropped = [], [], []
    read = test_script.read_dataset

    def recorded_read(path):
        reads.append(read(path))
        return reads[-1]

    class Recording(optimize.Generator):
        def __init__(self, gen):
            super().__init__(gen.engine, gen.tokenizer, gen.progress)

        def __call__(self, inputs, **kwargs):
            if "on_result" in kwargs:
                given.extend(inputs)
            return super().__call__(inputs, **kwargs)

    monkeypatch.setattr(test_script, "read_dataset", recorded_read)
    monkeypatch.setattr(
        test_script, "forget_pages", lambda path: dropped.append((path, len(reads)))
    )
    out = tmp_path / "out.jsonl"
    assert (
        test_script.main(
            ["--demo", "--out", str(out), "--max-new-tokens", "5"], prepare=reshaped(wrap=Recording)
        )
        == 0
    )
    before, section_3 = reads
    assert dropped == [
        (Path(test_script.parse_args([]).data), 1)
    ]  # after the check's read, before Section 3's
    assert len(given) == 30 and all(
        chat is record["message"] for chat, record in zip(given, section_3.records)
    )
    assert not any(chat is record["message"] for chat, record in zip(given, before.records))


def test_a_plain_run_never_executes_code_from_the_model_folder(tmp_path, capsys):
    """The folder's own modelling code (Phi-3-medium's carries one, mapped by its config's auto_map) runs only in
    --self-check's reference, which says so first; the engine reads the config's numbers and the weights alone."""
    model = write_tiny_model(tmp_path / "model")
    mark = tmp_path / "the folder's code ran"
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_phi3.Phi3Config",
        "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    for name in ("configuration_phi3.py", "modeling_phi3.py"):
        (model / name).write_text(f"open({str(mark)!r}, 'w').write('{name}')\n")
    out = tmp_path / "out.jsonl"
    assert (
        test_script.main(
            ["--model", str(model), "--device", "cpu", "--out", str(out), "--max-new-tokens", "4"]
        )
        == 0
    )
    assert not mark.exists() and len(out.read_text().splitlines()) == 30
    from orinfer.oracle import own_modeling_code

    assert own_modeling_code(
        model
    )  # the self-check would run it, and prints a line saying so first
