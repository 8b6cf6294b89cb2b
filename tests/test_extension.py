"""orinfer/extension.py and csrc/: the cache folder's key, a failed build said in one line with
nothing half-made left, and the kernels compiled for the Orin's sm_87 by JetPack 6.0's CUDA 12.2
compiler (NVRTC 12.2 from PyPI, in the jetpack stack: tests/run.sh). Their values against the eager
kernels are checked on a GPU (bench/fused_kernels.py, BENCHMARKS.md)."""

import ctypes
import multiprocessing
import os
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import NEW

from orinfer import extension, kernels
from orinfer.attention import paged
from orinfer.attention.reference import reference_paged
from orinfer.options import Options

JETPACK_STACK = sys.version_info[:2] == (3, 10)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a CUDA GPU builds and runs the extension"
)


@pytest.mark.unit
def test_the_cache_folder_changes_with_the_sources_and_the_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    orin, hopper = extension.folder("8.7"), extension.folder("9.0")
    assert orin != hopper and orin.parent == tmp_path / "orinfer"
    sources = tmp_path / "csrc"
    shutil.copytree(extension.SOURCES, sources)
    monkeypatch.setattr(extension, "SOURCES", sources)
    assert extension.folder("8.7") == orin
    (sources / "elementwise.cuh").write_text((sources / "elementwise.cuh").read_text() + "\n")
    assert extension.folder("8.7") != orin


def test_a_failed_build_is_one_line_naming_its_log_and_leaves_nothing(tmp_path, monkeypatch):
    """No CUDA compiler where CUDA_HOME points (an empty folder; and on these stacks a torch without
    CUDA): the child fails, the caller gets ExtensionUnavailable with the log's last line, and the
    cache holds no library or build folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "no-cuda").mkdir()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    with pytest.raises(extension.ExtensionUnavailable) as failed:
        extension.build("8.7")
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("orinfer's CUDA extension did not build for sm_87: ")
    log = tmp_path / "orinfer" / "cuda-extension-build.log"
    assert f"(the whole log: {log})" in message and log.is_file()
    assert [p.name for p in (tmp_path / "orinfer").iterdir()] == [log.name]


def _nvrtc() -> tuple[Path, Path] | None:
    """NVRTC 12.2's library and CUDA 12.2's runtime headers, where the stack installed them (beside
    its packages, not among them: torch 2.3.1's own CUDA wheels pin 12.1)."""
    root = Path(sys.prefix) / "cuda-12.2" / "nvidia"
    lib = root / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"
    include = root / "cuda_runtime" / "include"
    return (lib, include) if lib.is_file() and (include / "cuda_bf16.h").is_file() else None


# Every instantiation elementwise.cu and attention.cu launch: (kernel, template arguments) for each
# dtype, the packs of 16 bytes and of one element, and each head dimension.
def _instantiations() -> list[str]:
    names = []
    for dtype, wide in (("float", 4), ("__half", 8), ("__nv_bfloat16", 8)):
        for n in (1, wide):
            names += [f"orinfer::rms_norm_kernel<{dtype}, {n}, {add}>" for add in ("true", "false")]
            names.append(f"orinfer::silu_mul_kernel<{dtype}, {n}>")
            names.append(f"orinfer::rope_kernel<{dtype}, {n}>")
        names += [f"orinfer::paged_attention_kernel<{dtype}, {d}>" for d in paged.HEAD_DIMS]
    return names


def _compile_with_nvrtc(lib_path: Path, include: Path, source: str, names: list[str]) -> tuple:
    """(result code, NVRTC's version, its log, the cubin's size) for `source` compiled for sm_87."""
    lib = ctypes.CDLL(str(lib_path))
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"attention.cuh", 0,
                                  None, None) == 0  # fmt: skip
    for name in names:
        assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
    options = [b"--gpu-architecture=sm_87", b"--std=c++17", b"-I" + bytes(include),
               b"-I" + bytes(extension.SOURCES), b"--ptxas-options=-v"]  # fmt: skip
    code = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = ctypes.c_size_t()
    if code == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return code, (major.value, minor.value), log.value.decode(), cubin.value


def test_the_kernels_compile_for_sm87_with_cuda_12_2():
    import locale

    encoding = locale.getpreferredencoding()
    found = _nvrtc()
    if found is None:
        if JETPACK_STACK and os.environ.get("CI") == "true":
            pytest.fail("the jetpack stack must hold NVRTC 12.2 (tests/run.sh installs it)")
        pytest.skip("NVRTC 12.2 is installed in the jetpack stack only (tests/run.sh)")
    # attention.cuh includes elementwise.cuh: the one source holds every kernel
    source = (extension.SOURCES / "attention.cuh").read_text()
    headers = source + (extension.SOURCES / "elementwise.cuh").read_text()
    names = _instantiations()
    # every kernel the headers define is among those compiled
    assert set(re.findall(r"__global__ void (\w+)", headers)) == {
        n.split("::")[1].split("<")[0] for n in names
    }
    # in a process of its own: NVRTC sets the process's C locale, after which Python reads text
    # files as ASCII (later tests failed on the demo's non-ASCII output)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as child:
        code, version, log, cubin = child.submit(
            _compile_with_nvrtc, *found, source, names
        ).result()
    assert code == 0, log
    assert version == (12, 2)
    assert cubin > 0
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_87'", log)
    assert len(entries) == len(names) == 39
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) == len(names) and all(s == ("0", "0") for s in spills)
    assert locale.getpreferredencoding() == encoding  # this process's locale untouched


@pytest.fixture(scope="module")
def fused():
    major, minor = torch.cuda.get_device_capability()
    extension.load(f"{major}.{minor}")
    return kernels.cuda_extension()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_fused_kernels_give_eagers_values(fused, dtype):
    """RoPE and the SiLU gate bit for bit, on the model's strided views; RMSNorm's sums are taken in
    another order, so its output may differ by one rounding of the dtype, and the residual sum not
    at all."""
    eager, g = kernels.EAGER, torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    # sizes that take 16-byte packs, and sizes that leave one element at a time
    for tokens, dim, features, hidden in ((1, 64, 96, 5120), (5, 20, 90, 81), (300, 128, 96, 80)):
        qkv = rand(tokens, 12 * dim)
        qk = qkv[:, : 10 * dim].view(tokens, 10, dim)  # strided rows, as qkv_proj's output gives
        angles = rand(tokens, 1, dim).float() * 100
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        assert torch.equal(fused.rope(qk, cos, sin), eager.rope(qk, cos, sin))
        gate, up = rand(tokens, 2 * features).chunk(2, dim=-1)
        want = eager.silu_mul(gate.clone(), up.clone())  # eager's writes into its arguments
        assert torch.equal(fused.silu_mul(gate, up), want)
        for hidden in (hidden, 5120):
            x, h, w = rand(tokens, hidden), rand(tokens, hidden), rand(hidden)
            one_rounding = dict(rtol=torch.finfo(dtype).eps * 4, atol=1e-6)
            torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), eager.rms_norm(x, w, 1e-5),
                                       **one_rounding)  # fmt: skip
            (sum_f, out_f), (sum_e, out_e) = (
                fused.add_rms_norm(x, h, w, 1e-5),
                eager.add_rms_norm(x, h, w, 1e-5),
            )
            assert torch.equal(sum_f, sum_e)
            torch.testing.assert_close(out_f, out_e, **one_rounding)


def _paged_pass(g, dtype, heads, kv_heads, dim, block_size):
    """A pass as the paged layout cuts it: prompt chunks behind cached prefixes (tiles of 16, keys
    over many chunks of the kernel's), decode steps at several depths, a sequence at position 0;
    blocks handed out in a shuffled order. (q, k_rows, v_rows, tiles, tables)"""
    starts_news = [(0, 40), (300, 17), (1500, 1), (7, 1), (0, 1), (64, 33), (2040, 24)]
    most = max(-(-(s + n) // block_size) for s, n in starts_news)
    blocks = torch.randperm(len(starts_news) * most, generator=g).view(len(starts_news), most) + 1
    slots = (len(starts_news) * most + 1) * block_size
    k_rows, v_rows = (
        torch.randn(slots, kv_heads, dim, generator=g).to(dtype).cuda() for _ in range(2)
    )
    tokens = sum(n for _, n in starts_news)
    # the model's query: a view of the rotated queries and keys
    q = torch.randn(tokens, heads + kv_heads, dim, generator=g).to(dtype).cuda()[:, :heads]
    tiles, token = [], 0
    for row, (start, n) in enumerate(starts_news):
        tiles += [[token + a, min(16, n - a), start + a, row] for a in range(0, n, 16)]
        token += n
    return q, k_rows, v_rows, torch.tensor(tiles).cuda(), blocks.cuda()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_paged_kernel_equals_the_float32_reference(fused, dtype):
    """Every head size it is built for, one to eight query heads a KV head, one-token and 16-token
    blocks, with and without a sliding window: within the dtype's rounding of the reference (its
    probabilities are rounded to the dtype before their product with the values, as
    FlashAttention's are)."""
    kernel, g = torch.ops.orinfer.paged_attention, torch.Generator().manual_seed(0)
    tolerance = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    for dim, heads, kv_heads in ((128, 40, 10), (64, 9, 3), (96, 32, 32), (32, 16, 2), (16, 4, 2)):
        for block_size, window in ((1, 0), (16, 0), (16, 100), (1, 2047)):
            q, k_rows, v_rows, tiles, tables = _paged_pass(g, dtype, heads, kv_heads, dim,
                                                           block_size)  # fmt: skip
            args = (q, k_rows, v_rows, tiles, tables, block_size, window, dim**-0.5)
            case = f"head size {dim}, {heads}/{kv_heads} heads, block {block_size}, window {window}"
            torch.testing.assert_close(kernel(*args).float(), reference_paged(*args).float(),
                                       atol=tolerance, rtol=tolerance, msg=lambda m: f"{case}: {m}")  # fmt: skip
    assert paged.paged_kernel(torch.device("cuda"), dtype, 40, 10, 128) is kernel


@needs_cuda
@pytest.mark.parametrize("attention", ["paged", "padded"])
def test_the_engine_with_the_extension_equals_the_pipeline(tiny_dir, expected, public_chats,
                                                           longest_chat, attention):  # fmt: skip
    """The Orin's path (no Triton: the extension's kernels, its paged attention or the padded
    layout's SDPA) at float32 on a GPU gives the pipeline's text on the CPU."""
    import optimize

    gen = optimize.build(tiny_dir, device="cuda", dtype="float32", progress=False,
                         options=Options(compile=False, cuda_extension=True, attention=attention))  # fmt: skip
    assert gen.engine.model.kernels is kernels.cuda_extension()
    assert gen.engine.runner.backend.name == attention
    assert "elementwise kernels CUDA extension" in gen.describe()
    outs = gen(public_chats + [longest_chat], max_new_tokens=NEW, return_full_text=False)
    assert outs == expected


@pytest.mark.unit
def test_an_unwritable_cache_or_a_hung_build_is_one_line(tmp_path, monkeypatch, capsys):
    """A cache folder that cannot be made names the way out; a build past BUILD_TIMEOUT_S is
    stopped and said, its half-made folder removed; each build says first that it starts."""
    import subprocess

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where a folder must be
    with pytest.raises(extension.ExtensionUnavailable, match="set XDG_CACHE_HOME to a folder"):
        extension.build("8.7")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def hung(*args, timeout, **kwargs):
        raise subprocess.TimeoutExpired(args[0], timeout)

    monkeypatch.setattr(extension.subprocess, "run", hung)
    with pytest.raises(extension.ExtensionUnavailable) as failed:
        extension.build("8.7")
    assert f"no result after {extension.BUILD_TIMEOUT_S // 60} minutes" in str(failed.value)
    assert [p.name for p in (tmp_path / "cache" / "orinfer").iterdir()] == [
        "cuda-extension-build.log"
    ]
    assert "building orinfer's CUDA extension for sm_87, once" in capsys.readouterr().err


def test_the_operators_compile_against_this_torch_for_sm87(tmp_path):
    """elementwise.cu and attention.cu (the operators: torch's headers and the kernels) compiled for sm_87 against
    the installed torch's headers: in the jetpack stack those are torch 2.3's, the Orin's minor. It
    needs a CUDA compiler on this machine (any version that knows sm_87), not a GPU."""
    import shutil
    import subprocess

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    include = [f"-I{path}" for path in cpp_extension.include_paths()]
    for name in (n for n in extension.FILES if n.endswith(".cu")):
        command = [nvcc, "-std=c++17", "-c", str(extension.SOURCES / name), "-o",
                   str(tmp_path / f"{name}.o"), "-gencode=arch=compute_87,code=sm_87",
                   "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
                   "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                   *include]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        missing = "cuda_cmake_macros.h: No such file"  # a CPU-only torch ships no CUDA headers
        if done.returncode and missing in done.stderr:
            pytest.skip("this torch is built without CUDA: no c10/cuda headers to compile against")
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / f"{name}.o").stat().st_size > 0
