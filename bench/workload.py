"""White-box (it subclasses the engine, see bench/README.md). What the benchmark runs: workload W1 (OpenBookQA test
in the competition's format), scripted answers for orinfer (a bench-side Engine) and for transformers (a
LogitsProcessor), and the random Phi-3-medium both share."""

import gc
import json
from dataclasses import replace
from pathlib import Path

import torch

from orinfer.engine import Engine
from orinfer.oracle import transformers_model
from orinfer.selfcheck import unique_prompt_tokens  # noqa: F401  (stages count with it)
from orinfer.tiny import ASSETS, END_TOKEN

ROOT = Path(__file__).resolve().parents[1]


PROMPT = (
    "\nRead the question and answer the following sentence in given multiple choice.\nAnswer only the sentence "
    "you chose. Never include a question and other word in your answer.\n\nquestion: {stem}\nchoices: {choices}\n"
)


def competition_record(row: dict) -> dict:
    """One OpenBookQA row (HF schema) as a competition record: the organisers' prompt, answer = the gold choice."""
    texts = row["choices"]["text"]
    content = PROMPT.format(stem=row["question_stem"], choices=repr(texts))
    return {
        "message": [{"role": "user", "content": content}],
        "answer": texts[row["choices"]["label"].index(row["answerKey"])],
    }


def write_w1(folder: Path) -> Path:
    """W1: OpenBookQA test (500 items) as competition records, written as the JSONL file Section 3 reads."""
    rows = [
        json.loads(line)
        for line in (ROOT / "bench" / "data" / "openbookqa_test.jsonl").read_text().splitlines()
    ]
    path = folder / "w1.jsonl"
    path.write_text("".join(json.dumps(competition_record(r)) + "\n" for r in rows))
    return path


def synthetic_records(records: list, seed: int = 0) -> list[dict]:
    """W1's shape without OpenBookQA's text (issue 34: are constants tuned on W1 tuned to OpenBookQA?): each record's
    question and choices with every word replaced by a pseudo-word of the same length (letters drawn at random, case
    kept), the same number of choices, the answer the choice at the gold one's place, and the organisers' prompt."""
    import ast
    import random

    rng = random.Random(seed)

    def word(w: str) -> str:
        return (
            "".join(
                rng.choice("aeiou" if i % 2 else "bcdfghklmnprstvz") if c.isalpha() else c
                for i, c in enumerate(w)
            ).capitalize()
            if w[:1].isupper()
            else "".join(
                rng.choice("aeiou" if i % 2 else "bcdfghklmnprstvz") if c.isalpha() else c
                for i, c in enumerate(w)
            )
        )

    def text(t: str) -> str:
        return " ".join(word(w) for w in t.split(" "))

    out = []
    for r in records:
        content = r["message"][0]["content"]
        stem = content.split("question: ", 1)[1].split("\nchoices: ", 1)[0]
        choices = ast.literal_eval(content.rsplit("choices: ", 1)[1].strip())
        new = [text(c) for c in choices]
        out.append(
            {
                "message": [
                    {"role": "user", "content": PROMPT.format(stem=text(stem), choices=repr(new))}
                ],
                "answer": new[choices.index(r["answer"])],
            }
        )
    return out


def answer_scripts(tokenizer, records: list) -> list[list[int]]:
    """Scripted mode's forced output per record: the gold answer's tokens, then <|end|>."""
    rows = tokenizer([r["answer"] for r in records], add_special_tokens=False)["input_ids"]
    return [row + [END_TOKEN] for row in rows]


class ScriptedEngine(Engine):
    """Scripted mode, in the benchmark only: an engine that commits each request's script (gold answer, then
    <|end|>) instead of the model's argmax while the script lasts, so drafts are verified against the answer as a
    correct model's argmax would verify them, and every model computation still happens. `scripts[i]` belongs to
    request i (None: the argmax, as in free-running mode); other requests (the warm-up's probe) keep the argmax.
    The product's Engine has no such path: it commits the runner's argmax alone. Chained decode steps are fed the
    argmax on the device, so with scripts they are off."""

    def __init__(self, engine: Engine, scripts: list[list[int]] | None):
        super().__init__(
            engine.model,
            engine.eos_ids,
            engine.plan,
            engine.options,
            runner=engine.runner,
            observer=engine.observer,
        )
        self.lookup_draft_tokens = engine.lookup_draft_tokens
        self._chain = engine.options.chain_decode
        self.scripts = scripts

    @property
    def scripts(self) -> list[list[int]] | None:
        return self._scripts

    @scripts.setter
    def scripts(self, scripts: list[list[int]] | None) -> None:
        self._scripts = scripts
        self.options = replace(self.options, chain_decode=self._chain and scripts is None)

    def _collect(self, works, pending) -> list[int]:
        tokens = super()._collect(works, pending)
        if self.scripts is None:
            return tokens
        out, pos = [], 0
        for w in works:
            if not w.wants_logits:
                continue
            rows = tokens[pos : pos + w.sampled_rows]
            pos += len(rows)
            script = self.scripts[w.seq.index] if 0 <= w.seq.index < len(self.scripts) else None
            done = w.seq.num_generated
            out += (
                rows
                if script is None
                else [script[done + j] if done + j < len(script) else t for j, t in enumerate(rows)]
            )
        return out


def scripted(gen, scripts: list[list[int]] | None):
    """The generator `gen`, its engine replaced by a ScriptedEngine over the same model, runner and observer."""
    gen.engine = ScriptedEngine(gen.engine, scripts)
    return gen


def long_answers(scripts: list[list[int]], count: int, length: int = 500) -> list[list[int]]:
    """Scripts where `count` answers, spread over the run, go on to `length` tokens without <|end|> (their answer
    repeated): long generations among short ones."""
    out = [list(s) for s in scripts]
    for i in range(0, len(out), max(1, len(out) // count))[:count]:
        answer = out[i][:-1] or [100]
        out[i] = (answer * (length // len(answer) + 1))[:length]
    return out


def model_folder(tmp: Path) -> Path:
    """Config, generation config and tokenizer of Phi-3-medium; no weights (they are made on the GPU)."""
    import shutil

    folder = tmp / "phi3-medium-random"
    folder.mkdir()
    for f in ["config.json", "generation_config.json"]:
        shutil.copy(ASSETS / f, folder / f)
    for f in (ASSETS / "phi3-tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def random_init(seed: int):
    def init(model):
        g = torch.Generator(device=model.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.is_meta:  # read from the folder's checkpoint instead (loader.serve_from_file)
                    continue
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)

    return init


class Scripted:
    """transformers LogitsProcessor forcing each row to its script (gold answer tokens + <|end|>)."""

    def __init__(self, scripts_by_prompt: dict[tuple, list[int]], pad: int):
        self.by_prompt, self.pad = scripts_by_prompt, pad
        self.start, self.previous = None, None

    def __call__(self, input_ids, scores):
        rows, length = input_ids.shape
        prev = self.previous
        self.previous = input_ids.clone()
        if (
            prev is None
            or prev.shape != (rows, length - 1)
            or not torch.equal(prev, input_ids[:, :-1])
        ):
            self.start = length  # a new generate() call: the rows are prompts (left-padded)
            self.scripts = []
            for row in input_ids.tolist():
                i = 0
                while row[i] == self.pad:
                    i += 1
                self.scripts.append(self.by_prompt[tuple(row[i:])])
        step = length - self.start
        forced = torch.full_like(scores, float("-inf"))
        for r, script in enumerate(self.scripts):
            forced[r, script[min(step, len(script) - 1)]] = 0.0
        return forced


def hf_model(ours, folder: Path):
    """transformers' Phi-3 with SDPA on the very same tensors as `ours` (the self-check's reference)."""
    return transformers_model(ours, folder, "sdpa")


def count_forwards(model) -> list:
    counter = [0]
    model.register_forward_pre_hook(lambda m, a, kw=None: counter.__setitem__(0, counter[0] + 1))
    return counter


def fresh_run(gen) -> int:
    """Forget cached prefixes and zero the counters before a timed run; returns where its passes start in the log."""
    gen.reset()  # nothing of an earlier run may be reused
    gc.collect()
    gc.freeze()  # as Generator.warmup leaves it in test_script.py: the new prefix cache's tables are not rescanned
    return len(gen.observer.passes)


def set_scripts(gen, scripts: list[list[int]] | None) -> None:
    """The scripts of a generator made by `scripted` (None: the argmax, free-running)."""
    gen.engine.scripts = scripts
