"""Where the engine is assembled: the model folder, the device, the dtype, the options and the
memory plan are resolved once (prepare -> Setup), the weights loaded (Setup.load), and a
pipe()-compatible generator returned (orinfer/pipeline.py: its call, its text handling, and what a
benchmark may read of it).

    gen = optimize.build("./models/Phi-3-medium-4k-instruct")
    gen.warmup()
    outs = gen(KeyDataset(data, "message"), max_new_tokens=500, return_full_text=False,
               do_sample=False)
"""

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

# First: it sets transformers' import-time environment before transformers is imported.
# Re-exported for test_script.py and bench/ (the documented surface).
from orinfer.pipeline import (  # noqa: F401
    SLIDING_WINDOW_APPLIES,
    Generator,
    RecordError,
    Report,
    prompt_ids,
)
from transformers import AutoTokenizer  # noqa: I100

from orinfer import extension, kernels
from orinfer.attention import planned, resolve
from orinfer.board import Jetson, environment_notes, is_jetson, read_jetson
from orinfer.checkpoint import check_checkpoint
from orinfer.config import ModelConfig, eos_token_ids
from orinfer.engine import Engine
from orinfer.integers import ceil_div
from orinfer.loader import load_weights, serve_from_file, tensor_dtype
from orinfer.memory import (
    GiB,
    MIN_KV_TOKENS,
    BudgetTooSmall,
    MemoryPlan,
    is_integrated,
    machine_bytes,
    parse_budget,
    plan_memory,
    rss_bytes,
)
from orinfer.model import CausalLM
from orinfer.observe import Observer
from orinfer.options import Options

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str, cfg: ModelConfig) -> torch.dtype:
    name = cfg.torch_dtype if dtype == "auto" else dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}: choose auto, bfloat16, float16 or float32")
    return _DTYPES[name]


class SetupError(Exception):
    """What is wrong with the model folder, the device or an option, found before any weight is
    loaded."""


class InputError(ValueError):
    """One input the run cannot take (found before any weight is loaded): `index` says which."""

    def __init__(self, index: int, what: str):
        super().__init__(what)
        self.index = index


@dataclass(frozen=True)
class Setup:
    """All that build() decides before the weights load: the folder's config and tokenizer, the
    device, the dtype and the memory plan. A caller checks its inputs against it (prompt_lengths,
    sized_for) before the load."""

    folder: Path
    cfg: ModelConfig
    eos: list[int]
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    plan: MemoryPlan
    options: Options  # its `compile` and `cuda_extension` resolved to True or False
    # plan_memory's arguments besides the budget and the run's needs
    plan_inputs: dict = field(default_factory=dict)
    board: Jetson | None = None  # on a Jetson: its module, power mode, clocks (orinfer/board.py)
    # why the elementwise kernels stay eager on a CUDA device (the extension did not build)
    kernels_note: str | None = None

    def describe_machine(self) -> str:
        """Section 1's lines about the machine: on a Jetson the board (loud when below full speed);
        the settings of the environment that change the plan."""
        lines = []
        if self.board is not None:
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            lines.append(self.board.describe(sms))
        if self.kernels_note:
            lines.append(f"elementwise kernels eager: {self.kernels_note}")
        lines += [
            f"environment ({verdict}): {note}"
            for verdict, note in environment_notes(dict(os.environ), self.board)
        ]
        return "\n".join(lines)

    def plan_for(self, budget: int, kv_tokens_wanted: int | None = None) -> MemoryPlan:
        """The memory plan at this budget; its pass size is Options.pass_tokens where set."""
        plan = plan_memory(budget=budget, kv_tokens_wanted=kv_tokens_wanted, **self.plan_inputs)
        return (
            replace(plan, max_batched_tokens=self.options.pass_tokens)
            if self.options.pass_tokens
            else plan
        )

    def least_budget(self, kv_tokens: int, one_sequence: bool = False) -> int | None:
        """The smallest budget (to 0.01 GiB) whose plan leaves `kv_tokens` tokens of KV cache
        (`one_sequence`: and holds them as one sequence, its attention included); None if none can.
        """

        # the plan's KV tokens; -1 where the budget holds no plan at all
        def leaves(budget: int) -> int:
            try:
                return self.plan_for(budget).kv_tokens
            except MemoryError:
                return -1

        step = GiB // 100
        low, high = (
            0,
            self.plan_inputs["weights"] + 8 * GiB + 2 * kv_tokens * self.cfg.kv_bytes_per_token,
        )
        if leaves(high) < kv_tokens:
            return None
        # the cache grows with the budget: low never leaves enough, high does
        while high - low > step:
            mid = (low + high) // 2
            low, high = (low, mid) if leaves(mid) >= kv_tokens else (mid, high)
        # A larger budget can take larger passes, whose attention costs more a key: walk up rather
        # than bisect.
        budget = ceil_div(high, step) * step
        # budgets >= high all plan
        while one_sequence and not self.plan_for(budget).holds(kv_tokens):
            budget = ceil_div(budget * 51 // 50, step) * step
            if budget > 64 * high:
                return None
        return budget

    def prompt_lengths(self, items: list) -> list[int]:
        """Each input's prompt tokens, counted with a tokenizer instance of its own, thrown away
        after: a check made before the clock fills no cache (the BPE cache of tokenizers < 0.20 has
        no bound) that the run then uses."""
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        try:
            return [len(p) for p in prompt_ids(tokenizer, items)]
        except Exception:  # find the input at fault, one at a time
            for i, item in enumerate(items):
                try:
                    prompt_ids(tokenizer, [item])
                except Exception as e:
                    raise InputError(
                        i, f"the prompt cannot be tokenised ({type(e).__name__}: {e})"
                    ) from None
            raise

    def sized_for(self, lengths: list[int], max_new_tokens: int) -> "Setup":
        """This set-up with its KV pool sized to a run of prompts of these lengths and answers of up
        to max_new_tokens (no larger than what the run can hold at once); an InputError names the
        longest input when the budget's cache cannot hold it whole, with the budget that would."""
        needs = [n + max_new_tokens for n in lengths]
        longest = max(range(len(needs)), key=needs.__getitem__)
        if not self.plan.holds(needs[longest]):
            least = self.least_budget(needs[longest], one_sequence=True)
            hint = (
                f"pass --memory-budget {least / GiB:.2f}GiB or more"
                if least
                else "no budget holds it"
            )
            short = (
                f"leaves {self.plan.kv_tokens}"
                if needs[longest] > self.plan.kv_tokens
                else "has too little room for the attention over them"
            )
            raise InputError(
                longest,
                f"the prompt's {lengths[longest]} tokens and up to {max_new_tokens} new tokens "
                f"need {needs[longest]} tokens of KV cache, and the memory budget "
                f"({self.plan.budget / GiB:.2f} GiB) {short}: {hint}, or lower --max-new-tokens",
            )
        at_once = sum(sorted(needs, reverse=True)[: self.plan.max_num_seqs])
        return replace(self, plan=self.plan_for(self.plan.budget, at_once))

    def _kernels(self) -> kernels.Kernels:
        if self.options.compile:
            return kernels.compiled()
        return kernels.cuda_extension() if self.options.cuda_extension else kernels.EAGER

    def load(
        self,
        init: Callable[[CausalLM], None] | None = None,
        progress: bool = True,
        observer: Observer | None = None,
    ) -> Generator:
        """The weights onto the device (or `init` fills those on the device), and the generator. A
        token table the plan keeps off the device is read from the checkpoint's file either way."""
        if self.device.type == "cuda" and self.plan.device_cap is not None:
            # Fragmentation can grow torch's cache past the plan (0.2-0.3 GiB seen with 512-token
            # passes); capped, the allocator first frees cached blocks, and only then fails (the
            # engine then halves its passes), rather than take memory the host's share needs.
            index = torch.cuda.current_device() if self.device.index is None else self.device.index
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, self.plan.device_cap / total), index
            )
        model = CausalLM(
            self.cfg,
            self.device,
            self.dtype,
            self._kernels(),
            embedding_on_host=self.plan.embedding_on_host,
            mlp_rows=self.plan.mlp_rows,
        )
        loaded = None
        if init is None:
            loaded = load_weights(model, self.folder)
        else:
            init(model)
            serve_from_file(model, self.folder)
        cfg, options = self.cfg, self.options
        attention = resolve(options.attention, self.plan.attention_afforded, self.device,
                            self.dtype, cfg, options.packed_queries,
                            bool(options.cuda_extension))  # fmt: skip
        return Generator(
            Engine(model, self.eos, self.plan, options, attention, observer=observer),
            self.tokenizer,
            progress,
            loaded,
        )


def _check_weights(folder: Path) -> None:
    """Every shard whole before anything loads (a CheckpointError names the file); a folder with no
    checkpoint is the load's to refuse, since `init` may fill the weights."""
    try:
        check_checkpoint(folder)
    except FileNotFoundError:
        pass


def _tokenizer(folder: Path):
    """The folder's own tokenizer; a folder without one is refused naming what it needs
    (transformers would otherwise try to convert other files and suggest installing packages)."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise SetupError(
            f"{folder}: no tokenizer (tokenizer.json or tokenizer.model, with "
            "tokenizer_config.json): copy the model's tokenizer files into the folder"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    # transformers raises many kinds here, none of them the user's to read as a traceback
    except Exception as e:
        raise SetupError(
            f"{folder}: the tokenizer files cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): copy them again"
        ) from None


def _device(name: str | None) -> torch.device:
    if name is None:
        if not torch.cuda.is_available() and is_jetson():
            raise SetupError(
                "this is a Jetson, but torch sees no CUDA device (a container started without the "
                "NVIDIA runtime, or a torch built without CUDA): start the container with "
                "--runtime nvidia, use NVIDIA's JetPack torch, or pass --device cpu to run on the "
                "CPU (hours)"
            )
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SetupError(f"device {name!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(
                f"device {name!r}: this torch ({torch.__version__}) sees no CUDA device"
            )
        if (dev.index or 0) >= torch.cuda.device_count():
            raise SetupError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def prepare(
    model_dir: str | Path,
    device: str | None = None,
    dtype: str = "auto",
    memory_budget: str | int = "auto",
    options: Options = Options(),
    unified_memory: bool | None = None,
) -> Setup:
    """Read a local HF Phi-3 folder's config and tokenizer and plan the memory, loading no weight:
    any problem with the folder, the device or an option is a SetupError (one line) here, before the
    long part of a start."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise SetupError(
            f"no model at {folder} (config.json not found). Put the HF folder of "
            "Phi-3-medium-4k-instruct there, pass --model, or try the embedded tiny model with "
            "--demo"
        )
    dev = _device(device)
    try:
        _check_weights(folder)
        cfg = ModelConfig.from_folder(folder)
        if not SLIDING_WINDOW_APPLIES:
            cfg = replace(cfg, sliding_window=None)
        eos = eos_token_ids(folder)
        tokenizer = _tokenizer(folder)
        torch_dtype = resolve_dtype(dtype, cfg)
        itemsize = torch.finfo(torch_dtype).bits // 8
        shared = is_integrated(dev) if unified_memory is None else unified_memory
        budget = parse_budget(memory_budget, dev)
        in_file = tensor_dtype(folder, "model.embed_tokens.weight") == torch_dtype
        # after the folder's and the budget's checks (a first build takes a minute), before the
        # plan counts this process's host
        options, kernels_note = _resolve_kernels(options, dev)
        inputs = dict(cfg=cfg, weights=cfg.num_parameters * itemsize, itemsize=itemsize,
                      shared_host=shared, host_bytes=rss_bytes(), cuda=dev.type == "cuda",
                      table_in_checkpoint=in_file,
                      attention=planned(options.attention, dev.type))  # fmt: skip
    except (OSError, ValueError, KeyError) as e:
        raise SetupError(f"{folder}: {e}" if isinstance(e, (OSError, KeyError)) else str(e)) from e
    most = machine_bytes(dev, shared)
    if budget > most:
        if memory_budget not in (None, "auto"):
            raise SetupError(
                f"--memory-budget {budget / GiB:.2f} GiB is more than this machine has "
                f"({most / GiB:.2f} GiB)"
            )
        budget = most  # RSS + MemAvailable counts a file's mapped pages twice
    board = read_jetson() if dev.type == "cuda" and shared else None
    setup = Setup(folder, cfg, eos, tokenizer, dev, torch_dtype, None, options, inputs, board,
                  kernels_note)  # fmt: skip
    try:
        return replace(setup, plan=setup.plan_for(budget))
    except BudgetTooSmall as e:
        least = setup.least_budget(MIN_KV_TOKENS)
        raise SetupError(
            f"{e}: at least {least / GiB:.2f} GiB is needed" if least else str(e)
        ) from None


def _resolve_kernels(options: Options, dev: torch.device) -> tuple[Options, str | None]:
    """Options.compile, then Options.cuda_extension, resolved (None takes each where it runs, the
    extension only where torch.compile is not taken; True where it cannot is an error), with why
    the extension is not taken on a CUDA device where it was left to choose. The extension is
    built (once per machine) and loaded here: before the plan counts this process's host memory."""
    if options.compile is None:
        options = replace(options, compile=kernels.compile_available(dev))
    runs = kernels.compile_available(dev) if dev.type == "cuda" else kernels.compile_supported()
    if options.compile and not runs:
        raise SetupError(
            f"compile=True needs a torch >= 2.6, with Triton on CUDA (device {dev}, torch "
            f"{torch.__version__})"
        )
    wanted = options.cuda_extension
    if wanted and (options.compile or dev.type != "cuda"):
        raise SetupError(
            "cuda_extension=True needs a CUDA device and compile=False "
            f"(device {dev}, compile={options.compile})"
        )
    if wanted is False or options.compile or dev.type != "cuda":
        return replace(options, cuda_extension=False), None
    try:
        major, minor = torch.cuda.get_device_capability(dev)
        extension.load(f"{major}.{minor}")
    except extension.ExtensionUnavailable as e:
        if wanted:
            raise SetupError(str(e)) from None
        return replace(options, cuda_extension=False), str(e)
    return replace(options, cuda_extension=True), None


def build(
    model_dir: str | Path,
    device: str | None = None,
    dtype: str = "auto",
    memory_budget: str | int = "auto",
    options: Options = Options(),
    progress: bool = True,
    unified_memory: bool | None = None,
    init: Callable[[CausalLM], None] | None = None,
    observer: Observer | None = None,
    kv_tokens: int | None = None,
) -> Generator:
    """Load a local HF Phi-3 folder straight onto the device and return the pipe()-compatible
    generator (prepare, then Setup.load).

    `unified_memory` (default: detected) counts the host process and CUDA context inside the budget,
    as on a Jetson; the benchmark sets it to emulate the Orin on a discrete GPU. `init` fills the
    weights on the device instead of the folder's checkpoint (benchmarks: random weights; the folder
    then needs only config and tokenizer files, and the token table where the plan reads it from the
    file). `options`: how the engine runs (orinfer/options.py); `observer`: what a benchmark or test
    sees of the run (orinfer/observe.py). `kv_tokens`: the most KV cache the caller's inputs can use
    at once (None: all the budget leaves; test_script.py sizes it with Setup.sized_for)."""
    setup = prepare(model_dir, device, dtype, memory_budget, options, unified_memory)
    if kv_tokens is not None:
        setup = replace(setup, plan=setup.plan_for(setup.plan.budget, kv_tokens))
    return setup.load(init, progress, observer)
