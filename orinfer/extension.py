"""orinfer's CUDA extension (csrc/): the fused elementwise kernels and the paged attention kernel
for CUDA GPUs whose torch has no Triton (NVIDIA's JetPack wheels), built once per machine by torch's
own extension builder (torch.utils.cpp_extension, which runs nvcc through ninja) and kept in the
user's cache folder.

The build runs in a child process, so the compiler's memory and the builder's imports (setuptools)
never reach the process that then holds the weights; it builds into a temporary folder that is
renamed into place when whole, so an interrupted build leaves nothing half-made. The folder's name
is a digest of the sources, this torch, its CUDA, Python and the device's architecture: a change to
any of them builds afresh. The Jetson image builds it at `docker build` (docker/Dockerfile.jetson);
elsewhere the first run builds it, before its model loads.

    python orinfer/extension.py --arch 8.7 [--into FOLDER]   # the build itself (the child's)
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

NAME = "orinfer_elementwise"
SOURCES = Path(__file__).resolve().parent / "csrc"
FILES = ("elementwise.cu", "elementwise.cuh", "attention.cu", "attention.cuh", "dispatch.h")


class ExtensionUnavailable(RuntimeError):
    """Why the extension cannot be built or loaded here, in one line."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orinfer"


def folder(arch: str) -> Path:
    """Where the library for `arch` ("8.7": compute capability) is kept."""
    import torch

    digest = hashlib.sha256()
    for name in FILES:
        digest.update((SOURCES / name).read_bytes())
    python = "%d.%d" % sys.version_info[:2]
    digest.update(f"{torch.__version__} {torch.version.cuda} {arch} {python}".encode())
    return cache_root() / f"cuda-extension-{digest.hexdigest()[:16]}"


# A build that has not finished by then is stopped (a hung compiler must not hold the run forever).
BUILD_TIMEOUT_S = 20 * 60


def build(arch: str) -> Path:
    """The library for `arch`, built now unless the cache holds it (saying so on stderr first: a
    minute or more). ExtensionUnavailable, with the build's last line and where its whole log is,
    where it cannot be built or the cache cannot be written."""
    target = folder(arch)
    library = target / f"{NAME}.so"
    if library.is_file():
        return library
    log = target.parent / "cuda-extension-build.log"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    except OSError as e:
        raise ExtensionUnavailable(
            f"orinfer's CUDA extension cannot be built in {target.parent} ({e.strerror}): set "
            "XDG_CACHE_HOME to a folder you can write"
        ) from None
    sm = "sm_" + arch.replace(".", "")
    print(f"building orinfer's CUDA extension for {sm}, once for this machine (a minute or more; "
          f"log: {log})", file=sys.stderr, flush=True)  # fmt: skip
    failure = _build_in_child(arch, tmp, log)
    if failure:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExtensionUnavailable(
            f"orinfer's CUDA extension did not build for {sm}: {failure} (the whole log: {log})"
        )
    try:
        tmp.rename(target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return library


def _build_in_child(arch: str, into: Path, log: Path) -> str | None:
    """None once a child process has built the library into `into`; else why not, in one line."""
    child = [sys.executable, str(Path(__file__).resolve()), "--arch", arch, "--into", str(into)]
    try:
        with open(log, "w", encoding="utf-8") as out:
            code = subprocess.run(child, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=BUILD_TIMEOUT_S).returncode  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"no result after {BUILD_TIMEOUT_S // 60} minutes"
    except OSError as e:
        return f"its log cannot be written ({e.strerror})"
    if code == 0:
        return None
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit code {code}"


@lru_cache(maxsize=None)
def load(arch: str) -> None:
    """torch.ops.orinfer's operators registered in this process (built first if need be), once."""
    import torch

    library = build(arch)
    try:
        torch.ops.load_library(str(library))
    except OSError as e:  # a file cut short (a full disk), say
        raise ExtensionUnavailable(
            f"orinfer's CUDA extension at {library} does not load ({e}): delete {library.parent} "
            "to build it again"
        ) from None


def _build_here(arch: str, into: str) -> int:
    """The child's work: nvcc and ninja found, then torch's builder; one line on what is missing."""
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # the device's, not every architecture torch knows
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        print(f"this torch ({torch.__version__}) is built without CUDA")
        return 1
    if cpp_extension.CUDA_HOME is None:
        print("no CUDA compiler found: set CUDA_HOME to the CUDA toolkit (e.g. /usr/local/cuda)")
        return 1
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        print("ninja is not installed (pip install ninja)")
        return 1
    sources = [str(SOURCES / name) for name in FILES if name.endswith(".cu")]
    cpp_extension.load(NAME, sources, extra_cuda_cflags=["-O3"], build_directory=into,
                       is_python_module=False, verbose=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help="compute capability, e.g. 8.7 (the Orin)")
    parser.add_argument("--into", help="build folder (default: the cache's, as a run keeps it)")
    args = parser.parse_args()
    if args.into:
        sys.exit(_build_here(args.arch, args.into))
    try:
        print(build(args.arch))
    except ExtensionUnavailable as e:
        print(e, file=sys.stderr)
        sys.exit(1)
