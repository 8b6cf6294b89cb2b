"""`test_script.py --self-check`: before the competition run on a new board, one command says
whether the board, the memory plan and the outputs are what the project promises, each line a check
with its figure and a verdict, and the fix for what is not: the device (on a Jetson its power mode
and GPU clock), the rates it reaches, the memory plan against what the run then holds, the attention
kernels, the engine's outputs against transformers' on the very same weight tensors, and the Section
3 time this data file can be expected to take. Untimed; writes no results file.
"""

import gc
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .board import (
    MEASURED_SHARE,
    ORIN_DRAM_BYTES,
    Jetson,
    datasheet,
    environment_notes,
    read_jetson,
)
from .integers import ceil_div
from .memory import (
    SAFETY_BYTES,
    GiB,
    describe_terms,
    desktop_session,
    is_integrated,
    is_out_of_memory,
    meminfo_available,
    peak_rss_bytes,
    proc_kib_fields,
    shared_memory_terms,
)
from .observe import Observer
from .oracle import own_modeling_code, reference_tokens, top2_margin, transformers_model
from .attention import paged
from .attention.reference import reference_attention
from .warmup import seconds_per_call

# bf16 and fp16 greedy outputs differ from another implementation's at near-ties (two logits within
# rounding of each other); a first difference where transformers' top two logits are further apart
# than this is called a bug.
NEAR_TIE = {torch.bfloat16: 0.5, torch.float16: 0.1, torch.float32: 0.0}


@dataclass(frozen=True)
class Check:
    name: str
    figure: str
    # "ok", "warn" (the run works, slower or less sure than it should) or "FAIL"
    verdict: str = "ok"
    fix: str = ""

    def line(self) -> str:
        return f"[{self.verdict:>4}] {self.name}: {self.figure}" + (
            f" -> {self.fix}" if self.fix else ""
        )


class Checks(list):
    """The checks so far, each printed the moment it is made, so that a self-check killed by the OOM
    killer, an assert or a hang still shows what it found; `step` names what it is doing now (for
    the line a fault prints)."""

    def __init__(self, out):
        super().__init__()
        self.out, self.step = out, "start"

    def add(self, *checks: Check) -> None:
        for check in checks:
            self.append(check)
            print(check.line(), file=self.out, flush=True)


def device_checks(device: torch.device, jetson: Jetson | None) -> list[Check]:
    """What the device is; on a Jetson also its board, power mode and GPU clock (jetson_checks)."""
    if device.type != "cuda":
        import platform

        return [
            Check(
                "device",
                f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}",
            )
        ]
    props = torch.cuda.get_device_properties(device)
    checks = [
        Check(
            "device",
            f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / GiB:.1f} GiB, torch {torch.__version__}",
        )
    ]
    if jetson is not None:
        checks += jetson_checks(
            jetson, torch.__version__, torch.cuda.get_arch_list(), props.multi_processor_count
        )
    return checks + [
        Check("environment", note, verdict)
        for verdict, note in environment_notes(dict(os.environ), jetson)
    ]


def jetson_checks(
    jetson: Jetson, torch_version: str, arch_list: list[str], sms: int | None = None
) -> list[Check]:
    """The board, its module's speed, power mode and GPU clock, each with the command that fixes it
    where it is off; the torch build (a JetPack build has sm_87 kernels, whatever its version string
    says)."""
    first, *loud = jetson.describe(sms).split("\n")
    fix = "sudo nvpmodel -m 0 (MAXN), then sudo jetson_clocks" if loud else ""
    board = Check("board", first.removeprefix("board: "), "warn" if loud else "ok", fix)
    built = "sm_87" in arch_list
    kernels = f"torch {torch_version}, kernels for {', '.join(arch_list) or 'no GPU'}"
    wheel = (
        "" if built else "this torch has no sm_87 kernels: use NVIDIA's JetPack wheel (the image's)"
    )
    checks = [board, Check("torch build", kernels, "ok" if built else "FAIL", wheel)]
    return checks + [_power_check(jetson)] + ([_clock_check(jetson)] if jetson.gpu_max_freq else [])


def _power_check(jetson: Jetson) -> Check:
    if jetson.power_mode is None:
        return Check(
            "power mode",
            "nvpmodel gave no answer",
            "warn",
            "sudo nvpmodel -q says which mode is set",
        )
    if jetson.power_mode.startswith("MAXN"):
        return Check("power mode", f"MAXN (mode {jetson.power_mode_id})")
    figure = (
        f"{jetson.power_mode} (mode {jetson.power_mode_id}), not MAXN: the GPU runs fewer SMs at a "
        "lower clock, at less than half the speed"
    )
    fix = "sudo nvpmodel -m 0 (MAXN; it may ask for a reboot), then sudo jetson_clocks"
    return Check("power mode", figure, "warn", fix)


def _clock_check(jetson: Jetson) -> Check:
    most = jetson.gpu_max_freq / 1e6
    mhz = f"GPU clock {jetson.gpu_freq / 1e6:.0f} MHz of at most {most:.0f}" if jetson.gpu_freq \
        else f"GPU clock at most {most:.0f} MHz"  # fmt: skip
    if jetson.clocks_pinned:
        return Check("gpu clock", mhz + ", pinned")
    ramps = ", not pinned (it ramps up under load: a cold start runs slow)"
    return Check("gpu clock", mhz + ramps, "warn", "sudo jetson_clocks")


def measure_rates(model, pass_tokens: int) -> tuple[float, float]:
    """(GEMM FLOP/s at a pass's shape, weight-read bytes/s), on the model's own weights: a pass's
    tokens times the first layer's gate_up_proj, and a reduction over whole layers' weights (a
    decode pass is such a read)."""
    device, weight = model.device, model.model.layers[0].mlp.gate_up_proj.weight
    rows = max(1, min(pass_tokens, 2048))
    x = torch.randn(rows, weight.shape[1], device=device, dtype=weight.dtype)
    gemm = (
        2
        * rows
        * weight.shape[0]
        * weight.shape[1]
        / seconds_per_call(device, lambda: F.linear(x, weight), 5)
    )
    weights, size = [], 0
    for layer in model.model.layers:
        for p in layer.parameters():
            weights.append(p)
            size += p.nbytes
        if size >= GiB:
            break
    read = size / seconds_per_call(device, lambda: [p.sum() for p in weights], 3)
    return gemm, read


def rate_checks(
    device: torch.device, dtype: torch.dtype, rates: tuple[float, float], jetson: Jetson | None
) -> list[Check]:
    """The measured rates against the device's datasheet, where the project knows it."""
    gemm, read, kind = rates[0], rates[1], str(dtype).removeprefix("torch.")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sheet = datasheet(name) if jetson is None else (jetson.maxn_peak_flops(), ORIN_DRAM_BYTES)
    if sheet is None or dtype == torch.float32:  # the datasheets give half-precision tensor rates
        return [
            Check(
                "rates",
                f"{kind} GEMM {gemm / 1e12:.2f} TFLOP/s, weight read {read / 1e9:.1f} GB/s (no "
                "datasheet figure for this device and dtype to compare)",
            )
        ]
    checks = []
    for what, got, peak, share, unit in (
        (f"{kind} GEMM", gemm, sheet[0], MEASURED_SHARE[0], 1e12),
        ("weight read", read, sheet[1], MEASURED_SHARE[1], 1e9),
    ):
        figure = (
            f"{what} {got / unit:.2f} {'TFLOP/s' if unit == 1e12 else 'GB/s'}: {got / peak:.0%} of "
            f"the datasheet's {peak / unit:.1f} (published measurements reach ~{share:.0%})"
        )
        slow = got < 0.5 * peak
        checks.append(
            Check(
                "rates",
                figure,
                "warn" if slow else "ok",
                "far below: check the power mode, the clocks and other processes" if slow else "",
            )
        )
    return checks


def memory_checks(
    plan, memory_budget: str, longest_need: int, shared_host: bool, refused: str | None
) -> list[Check]:
    """Where the budget came from, the plan's lines, and the longest record's need against the KV
    cache (`refused`: why optimize's Setup.sized_for, the one fit rule, refused this data file, with
    the budget that would hold it)."""
    source = (
        "given (--memory-budget)"
        if memory_budget not in (None, "auto")
        else (
            "auto: " + describe_terms(shared_memory_terms())
            if shared_host
            else "auto: the GPU's free memory"
        )
    )
    desktop = desktop_session()
    if desktop:
        source += f"; a desktop session runs ({desktop}): a headless boot frees ~0.8 GB"
    swap = proc_kib_fields("/proc/meminfo", ("SwapFree",))["SwapFree"]
    checks = [
        Check(
            "memory budget",
            f"{plan.budget / GiB:.2f} GiB, {source}; MemAvailable now "
            f"{meminfo_available() / GiB:.2f} GiB, swap free {swap / GiB:.2f} GiB (swap never "
            "holds GPU memory)",
        )
    ]
    checks += [Check("plan", line.strip()) for line in plan.describe().splitlines() if line.strip()]
    checks.append(
        Check(
            "longest record",
            f"its prompt + max new tokens need {longest_need} KV tokens of the plan's "
            f"{plan.kv_tokens}",
            "ok" if refused is None else "FAIL",
            "" if refused is None else f"{refused}; or free memory (a headless boot frees ~0.8 GB)",
        )
    )
    return checks


def peak_check(plan, device: torch.device, name: str = "memory peak") -> Check:
    """What the process held at its peak so far (the warm-up runs passes of the plan's largest size)
    against the budget."""
    host = peak_rss_bytes()
    device_peak = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    held = device_peak + (host if plan.shared_host or device.type != "cuda" else 0)
    figure = (
        f"peak {held / GiB:.2f} GiB of the {plan.budget / GiB:.2f} GiB budget (device reserved "
        f"{device_peak / GiB:.2f}, host RSS {host / GiB:.2f})"
    )
    try:
        nvmap = proc_kib_fields("/proc/meminfo", ("NvMapMemUsed",))["NvMapMemUsed"]
        figure += f"; NvMapMemUsed {nvmap / GiB:.2f} GiB"
    except RuntimeError:  # not a Jetson
        pass
    over = held > plan.budget
    return Check(
        name,
        figure,
        "FAIL" if over else "ok",
        "the plan's margins are off on this board: lower --memory-budget by the excess"
        if over
        else "",
    )


def reset_peaks(device: torch.device) -> None:
    """Start the device's and the host's peak anew (VmHWM through /proc/self/clear_refs; where that
    is refused the host's peak stays the whole process's, which only overstates)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def kernel_checks(
    device: torch.device,
    dtype: torch.dtype,
    attention: str,
    kernels_note: str | None,
    heads: tuple[int, int, int],
) -> list[Check]:
    """The attention path the run takes (a warning where the CUDA extension did not build:
    `kernels_note`), orinfer's paged kernel on the model's `heads` (query heads, KV heads, head
    size) where the extension is loaded, and each SDPA backend this torch offers against the float32
    reference on a small causal case (the padded layout asks for flash, then memory-efficient, then
    math)."""
    checks = [Check("attention", attention.removeprefix("attention: "))]
    if kernels_note:
        checks.append(Check("elementwise kernels", "eager", "warn", kernels_note))
    kernel = paged.loaded_kernel(device, *heads)
    if kernel is not None:
        checks.append(paged_kernel_check(kernel, device, dtype, heads))
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 4, 24, 64, device=device, dtype=dtype, generator=g) for _ in range(3))
    expected = reference_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
    found = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1)
        except RuntimeError:
            found.append(f"{backend.name.lower()} not here")
            continue
        diff = (out.float() - expected).abs().max().item()
        ok = diff <= (1e-4 if dtype == torch.float32 else 2e-2)
        found.append(f"{backend.name.lower()} {'agrees' if ok else 'DIFFERS'} ({diff:.1e})")
        if not ok:
            checks.append(
                Check(
                    "sdpa",
                    f"{backend.name.lower()} differs from the float32 reference by {diff:.2e}",
                    "FAIL",
                    "report this torch build; run with --no-cuda-graphs to rule graphs out",
                )
            )
    try:
        import triton  # noqa: F401

        triton_line = "Triton importable"
    except ImportError:
        triton_line = (
            "no Triton (compiled kernels and the packed attention kernel off: expected on JetPack)"
        )
    checks.insert(1, Check("sdpa", ", ".join(found) + f"; {triton_line}"))
    return checks


def paged_kernel_check(kernel, device: torch.device, dtype: torch.dtype, heads) -> Check:
    """orinfer's paged attention kernel against the float32 reference: where it differs the run
    does not take it (attention.resolve moves on to the padded layout), which is slower, not
    wrong; the attention line says which the run took."""
    agrees, difference = paged.kernel_difference(kernel, device, dtype, *heads)
    if agrees:
        return Check("paged kernel", f"agrees with the float32 reference ({difference:.1e})")
    return Check(
        "paged kernel",
        f"differs from the float32 reference by {difference:.2e}: not taken",
        "warn",
        "the run takes the padded layout instead (slower); report this board, JetPack and torch",
    )


def pick_records(lengths: list[int], k: int) -> list[int]:
    """k records: the longest prompt first, then others spread evenly over the file."""
    n = len(lengths)
    picked = [max(range(n), key=lengths.__getitem__)]
    picked += [round(i * (n - 1) / max(1, k - 1)) for i in range(k)]
    picked += range(n)  # where the spread repeats itself (a short file), the rest in order
    return list(dict.fromkeys(picked))[: min(k, n)]


def compare(
    ours: dict[int, list[int]], prompts: dict[int, list[int]], hf, new_tokens: int, eos: set[int]
) -> list:
    """(record, first differing position, ours, theirs, transformers' top-2 margin there) for each
    record whose tokens differ from transformers'."""
    differences = []
    for i, prompt in prompts.items():
        theirs, mine = reference_tokens(hf, prompt, new_tokens, eos), ours[i][:new_tokens]
        if mine != theirs:
            j = next(
                (j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b),
                min(len(mine), len(theirs)),
            )
            differences.append(
                (
                    i,
                    j,
                    mine[j] if j < len(mine) else None,
                    theirs[j] if j < len(theirs) else None,
                    top2_margin(hf, prompt + theirs[:j]),
                )
            )
    return differences


def output_check(
    attention: str,
    differences: list,
    total: int,
    dtype: torch.dtype,
    lines: list[int],
    code: str = "",
) -> Check:
    """One line per attention implementation: identical k/K, and each difference with its margin.
    `code`: which modeling code the reference ran."""
    name = f"outputs vs transformers ({attention})"
    if not differences:
        return Check(name, f"identical {total}/{total}{code}")
    detail = "; ".join(
        f"line {lines[i]}: new token {j} (ours {a}, theirs {b}) at a top-2 margin of {m:.3f}"
        for i, j, a, b, m in differences
    )
    near = all(m <= NEAR_TIE[dtype] for *_, m in differences)
    figure = f"identical {total - len(differences)}/{total}{code}; {detail}"
    if near:
        return Check(
            name,
            figure + f" (near-ties: <= {NEAR_TIE[dtype]} in {str(dtype).removeprefix('torch.')})",
            "warn",
        )
    return Check(
        name, figure, "FAIL", "a difference away from a near-tie is a bug: report it with this line"
    )


def unique_prompt_tokens(prompts: list[list[int]]) -> int:
    """Tokens left to compute if every shared prompt prefix is computed once (the nodes of the
    prompts' trie)."""
    seen, count = set(), 0
    for p in prompts:
        h = 0
        for t in p:
            h = hash((h, t))
            if h not in seen:
                seen.add(h)
                count += 1
    return count


def projection_check(
    cfg,
    plan,
    prompts: list[list[int]],
    answer_tokens: int,
    max_new_tokens: int,
    rates: tuple[float, float],
    itemsize: int,
) -> Check:
    """Section 3's time for this data file at the measured rates (an estimate): its prompt tokens
    after prefix sharing at the GEMM rate, and its decode passes (each reads the weights once) at
    the read rate: as many waves of the plan's sequences as the file needs, each as long as the
    longest checked answer, or as max_new_tokens."""
    gemm, read = rates
    unique = unique_prompt_tokens(prompts)
    prefill = unique * 2 * cfg.num_parameters / gemm
    waves = ceil_div(len(prompts), plan.max_num_seqs)
    per_pass = cfg.num_parameters * itemsize / read
    short, longest = _section3(prefill, waves, per_pass, answer_tokens, max_new_tokens)
    return Check(
        "projection",
        f"an estimate at the measured rates: Section 3 ~{short:.1f} s if no answer is longer than "
        f"the longest checked one ({answer_tokens} tokens), at most {longest:.1f} s if one runs to "
        f"{max_new_tokens}; {prefill:.1f} s of it prefill ({unique} prompt tokens after prefix "
        f"sharing), {waves} wave(s) of up to {plan.max_num_seqs} sequences, {per_pass * 1e3:.0f} "
        "ms a decode pass (drafts only shorten it)",
    )


def _section3(prefill: float, waves: int, per_pass: float, answer: int, most: int) -> tuple:
    """Section 3 in seconds if no answer outgrows `answer` tokens, and if one runs to `most`."""
    return prefill + waves * answer * per_pass, prefill + waves * most * per_pass


def timed_pass_check(
    passes: list, cfg, plan, prompts: list[list[int]], answer_tokens: int, max_new_tokens: int
) -> Check:
    """Section 3 projected from passes of the plan's sizes timed on this device (the warm-up's probe
    and the outputs' run, each pass from its first kernel to its tokens' copy on the device's
    clock): the largest pass's tokens a second for the prompts after prefix sharing, and the median
    small pass (the plan's sequences and drafts or fewer) for each decode step. Every kernel of a
    pass is in it, which the rates' estimate leaves out."""
    timed = [
        (p.tokens, p.device[1] - p.device[0])
        for p in passes
        if p.device is not None and not p.graph
    ]
    if not timed:
        return Check(
            "projection from timed passes", "no pass was timed on a device clock here (the CPU)"
        )
    big = max(timed)
    small = sorted(
        s for t, s in timed if t <= plan.max_num_seqs * (1 + plan.max_drafts) and t < big[0]
    )
    if not small or big[0] < plan.max_batched_tokens // 2:
        return Check(
            "projection from timed passes",
            f"no pass of the plan's sizes was timed (largest {big[0]} tokens)",
        )
    decode = small[len(small) // 2]
    prefill = unique_prompt_tokens(prompts) * big[1] / big[0]
    waves = ceil_div(len(prompts), plan.max_num_seqs)
    short, longest = _section3(prefill, waves, decode, answer_tokens, max_new_tokens)
    return Check(
        "projection from timed passes",
        f"a {big[0]}-token pass took {big[1] * 1e3:.0f} ms ({big[0] / big[1]:.0f} tokens/s), a "
        f"decode pass {decode * 1e3:.0f} ms (the median of {len(small)}): Section 3 ~{short:.1f} s "
        f"if no answer is longer than the longest checked one, at most {longest:.1f} s if one runs "
        f"to {max_new_tokens}; {prefill:.1f} s of it prefill",
    )


def model_files_check(folder) -> Check:
    """The sha256 of every file of the model folder (read once, its pages dropped after: 26 GiB at
    the disk's rate), so that a run states what it ran where no revision of the HF repository is
    known."""
    import hashlib
    from pathlib import Path

    digests = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        digests.append(f"{path.name} {digest.hexdigest()}")
    return Check("model files", f"{folder}: " + "; ".join(digests))


def report(checks: list[Check], out) -> int:
    """The closing line (each check's line was printed as it was made); then, on stderr, one line
    per failing check. 0 when none failed, else 1."""
    import sys

    failed = [c for c in checks if c.verdict == "FAIL"]
    warned = sum(c.verdict == "warn" for c in checks)
    print(
        f"self-check: {len(checks) - len(failed) - warned} ok, {warned} warnings, {len(failed)} "
        "failed",
        file=out,
    )
    for check in failed:
        print(f"self-check failed: {check.name}: {check.figure}", file=sys.stderr)
    return 1 if failed else 0


def oom_check(gen, device: torch.device) -> Check:
    """Provoke one out-of-memory under the plan's cap (an allocation larger than the device leaves),
    and show the engine goes on after it: which exception came (on Tegra torch's allocator fails an
    NVML assert instead of raising OutOfMemoryError) and whether the engine's handler takes it for
    one (memory.is_out_of_memory)."""
    if device.type != "cuda":
        return Check("out of memory", "not provoked on the CPU (no device allocator to exhaust)")
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        torch.empty(total + GiB, dtype=torch.uint8, device=device)
        return Check(
            "out of memory",
            "an allocation larger than the device succeeded",
            "FAIL",
            "the allocator is not capped: report it",
        )
    except Exception as e:  # what the allocator raises is what this check is about
        kind, handled = type(e).__name__, is_out_of_memory(e)
    gen(["Say yes."], max_new_tokens=2)
    torch.cuda.empty_cache()
    return Check(
        "out of memory",
        f"provoked: {kind} ({'taken for' if handled else 'NOT taken for'} an out-of-memory by the "
        "engine), and the engine ran a request after it",
        "ok" if handled else "FAIL",
        "" if handled else "report this torch build's out-of-memory message",
    )


def run(
    setup,
    chats: list,
    lines: list[int],
    max_new_tokens: int,
    memory_budget: str,
    records: int,
    new_tokens: int,
    refused: str | None,
    checks: Checks,
) -> None:
    """Every check, in order, each added to `checks` (printed as made), with the model loaded once:
    `setup` is optimize.prepare's (sized for this file), `chats` the file's records' messages and
    `lines` the line each starts on. The device, the board, the budget and the plan come before the
    load."""
    from .pipeline import prompt_ids

    device = setup.device
    checks.step = "the device and the board"
    jetson = (
        setup.board
        if setup.board is not None
        else (read_jetson() if device.type == "cuda" and is_integrated(device) else None)
    )
    checks.add(*device_checks(device, jetson))
    checks.step = "the model folder's files"
    checks.add(model_files_check(setup.folder))
    checks.step = "the memory plan"
    prompts = prompt_ids(setup.tokenizer, chats)
    longest = max(map(len, prompts)) + max_new_tokens
    watch = MemoryWatch(setup.plan)
    checks.add(*memory_checks(setup.plan, memory_budget, longest, setup.plan.shared_host, refused))
    checks.step = "the load"
    gen = setup.load(observer=Observer(), progress=False)
    watch.sample("after the load")
    checks.step = "the warm-up"
    gen.warmup()
    watch.sample("after the warm-up")
    checks.add(peak_check(setup.plan, device), *watch.checks())
    checks.step = "a provoked out-of-memory"
    checks.add(oom_check(gen, device))
    checks.step = "the rates"
    rates = measure_rates(gen.model, setup.plan.max_batched_tokens)
    checks.add(*rate_checks(device, setup.dtype, rates, jetson))
    heads = setup.cfg.attention_heads
    checks.add(*kernel_checks(device, setup.dtype, gen.describe(), setup.kernels_note, heads))
    checks.step = "the engine's outputs"
    picked = pick_records([len(p) for p in prompts], records)
    ours, passes, model = _engine_outputs(gen, [chats[i] for i in picked], picked, new_tokens)
    del gen
    _free(device)
    checks.step = "transformers' outputs on the same weights"
    _reference_checks(setup, model, ours, prompts, picked, new_tokens, lines, checks)
    checks.add(peak_check(setup.plan, device, "memory peak, the reference on the same weights"))
    answer = max(map(len, ours.values()))
    itemsize = torch.finfo(setup.dtype).bits // 8
    checks.add(
        projection_check(setup.cfg, setup.plan, prompts, answer, max_new_tokens, rates, itemsize),
        timed_pass_check(passes, setup.cfg, setup.plan, prompts, answer, max_new_tokens),
    )


def _engine_outputs(
    gen, chats: list, picked: list[int], new_tokens: int
) -> tuple[dict, list, object]:
    """The engine's tokens for the picked records, its passes, and its model; then its KV pool and
    graphs go, so that the reference fits the same budget on the same weights."""
    gen(chats, max_new_tokens=new_tokens, return_full_text=False)
    ours = {i: gen.observer.generated[j] for j, i in enumerate(picked)}
    passes, model = list(gen.observer.passes), gen.model
    gen.release()
    return ours, passes, model


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peaks(device)


def _reference_checks(
    setup, model, ours, prompts, picked, new_tokens, lines, checks: Checks
) -> None:
    """The engine's tokens against transformers' (eager, as the organisers' load runs it, and SDPA);
    where the folder carries its own modelling code, a line says so before that code runs (a plain
    run never runs it)."""
    if own_modeling_code(setup.folder):
        checks.add(
            Check(
                "reference code",
                f"the reference now runs the modelling code in {setup.folder} (its config's "
                "auto_map), as the organisers' trust_remote_code=True load does",
            )
        )
    for attention in ("eager", "sdpa"):
        try:
            hf = transformers_model(model, setup.folder, attention)
        # the folder's own modeling code (trust_remote_code) may offer eager alone
        except ValueError as e:
            checks.add(
                Check(
                    f"outputs vs transformers ({attention})",
                    f"not offered by this model's code ({e})".split(". ")[0]
                    + "); the organisers' trust_remote_code load runs eager",
                )
            )
            continue
        differences = compare(ours, {i: prompts[i] for i in picked}, hf, new_tokens, set(setup.eos))
        code = (
            " (the folder's own modeling code)"
            if own_modeling_code(setup.folder)
            else " (transformers' own class)"
        )
        checks.add(output_check(attention, differences, len(picked), setup.dtype, lines, code))
        del hf
        gc.collect()


class MemoryWatch:
    """What the plan assumes, measured where memory is shared (a Jetson, or the emulation): the
    memory the process takes that torch's allocator does not hold (the CUDA context, kernel modules,
    page tables, the heap), the lowest MemAvailable, and pages swapped out (zram turns an overrun
    into a swap storm before any error)."""

    def __init__(self, plan):
        self.plan, self.samples = plan, []
        self.start_available, self.start_swap = meminfo_available(), _swapped_out()

    def sample(self, when: str) -> None:
        """The host's growth since the start (on a Jetson it includes every device allocation), and
        on a discrete GPU emulating one the device memory torch does not hold (the CUDA context,
        kernel modules, cuBLAS)."""
        used, reserved = self.start_available - meminfo_available(), 0
        if self.plan.cuda and torch.cuda.is_available():
            device = torch.device("cuda")
            reserved = torch.cuda.memory_reserved(device)
            if not is_integrated(device):
                free, total = torch.cuda.mem_get_info(device)
                used += total - free  # reserved included: taken off below, as on a Jetson
        self.samples.append((when, used, reserved, meminfo_available()))

    def checks(self) -> list[Check]:
        if not self.plan.shared_host or not self.samples:
            return []
        booked = self.plan.overhead - dict(self.plan.overhead_items).get("host at planning", 0)
        parts = [
            f"{when}: {(used - reserved) / GiB:.2f} GiB taken besides torch's pool"
            for when, used, reserved, _ in self.samples
        ]
        outside = max(used - reserved for _, used, reserved, _ in self.samples)
        lowest = min(avail for *_, avail in self.samples)
        swapped = _swapped_out() - self.start_swap
        over = max(0, outside - booked - SAFETY_BYTES)
        checks = [
            Check(
                "memory outside torch",
                "; ".join(parts) + f" (the plan books {booked / GiB:.2f} for it); "
                f"lowest MemAvailable {lowest / GiB:.2f} GiB",
                "warn" if over else "ok",
                f"pass --memory-budget {(self.plan.budget - over) / GiB:.2f}GiB to keep the plan's "
                "margins"
                if over
                else "",
            )
        ]
        checks.append(
            Check(
                "swap",
                f"{swapped / 2**20:.0f} MiB swapped out during the self-check",
                "FAIL" if swapped else "ok",
                "the run overran the memory: pass --memory-budget "
                f"{(self.plan.budget - swapped) / GiB:.2f}GiB or less"
                if swapped
                else "",
            )
        )
        return checks


def _swapped_out() -> int:
    """Bytes swapped out since boot (/proc/vmstat's pswpout, in pages)."""
    try:
        with open("/proc/vmstat") as f:
            pages = next((int(line.split()[1]) for line in f if line.startswith("pswpout ")), 0)
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
