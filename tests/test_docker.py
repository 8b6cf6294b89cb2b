"""The Jetson image rebuilds the same next month: every Python package pinned with its wheel's sha256, the lock
agreeing with requirements-jetson.txt and with the torch minor CI's JetPack stack tests, NVIDIA's downloads checked,
the build context kept small (the image itself is built on a Jetson only; hadolint lints it in tests/run.sh)."""

import re

import pytest
from conftest import ROOT

pytestmark = pytest.mark.unit

DOCKERFILE = (ROOT / "docker" / "Dockerfile.jetson").read_text()
# NVIDIA's wheel for JetPack 6, named as NVIDIA publishes it (the link in its PyTorch-for-Jetson release notes).
TORCH_WHEEL = "torch-2.3.0a0+40ec155e58.nv24.03.13384722-cp310-cp310-linux_aarch64.whl"


def lock() -> dict[str, tuple[str, list[str]]]:
    text = (ROOT / "docker" / "requirements-jetson.lock").read_text()
    pins = {}
    for entry in re.split(
        r"\n(?=[a-z0-9])", "\n".join(l for l in text.splitlines() if not l.startswith("#"))
    ):
        name, version = re.match(r"([a-z0-9._-]+)==(\S+)", entry.strip()).groups()
        pins[name] = (version, re.findall(r"--hash=sha256:([0-9a-f]{64})", entry))
    return pins


def test_the_lock_pins_every_package_with_a_hash_and_holds_requirements_jetson():
    pins = lock()
    assert all(hashes for _, hashes in pins.values())
    for line in (ROOT / "requirements-jetson.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            assert pins[name.lower()][0] == version.strip(), name
    for need in (
        "filelock",
        "typing-extensions",
        "sympy",
        "networkx",
        "jinja2",
        "fsspec",
    ):  # torch's own needs
        assert need in pins


def test_the_image_installs_the_lock_and_the_torch_minor_ci_tests():
    assert "--require-hashes -r requirements-jetson.lock" in DOCKERFILE
    assert f"--no-deps /tmp/{TORCH_WHEEL}" in DOCKERFILE
    run_sh = (ROOT / "tests" / "run.sh").read_text()
    assert re.search(
        r'make_venv jetpack "\$py310" "torch==2\.3\.\d+"', run_sh
    )  # the same minor, 2.3
    assert (
        "sha256sum -c" in DOCKERFILE
        and "import torch, transformers, optimize, test_script" in DOCKERFILE
    )
    assert "HF_HUB_OFFLINE=1" in DOCKERFILE and "TRANSFORMERS_OFFLINE=1" in DOCKERFILE


def test_the_image_builds_the_cuda_extension_for_sm87_into_the_cache_runs_read():
    """Built at `docker build` (no GPU there: the architecture named), with the lock's ninja, into the
    folder the entrypoint's runs look in (XDG_CACHE_HOME, set before the build and kept)."""
    build = DOCKERFILE.index("RUN python3 /orinfer/orinfer/extension.py --arch 8.7")
    assert DOCKERFILE.index("ENV XDG_CACHE_HOME=/orinfer/cache") < build
    assert DOCKERFILE.index("COPY orinfer ./orinfer") < build < DOCKERFILE.index("ENTRYPOINT")
    assert "ninja" in lock() and " g++ " in DOCKERFILE  # nvcc's host compiler


def test_the_build_context_leaves_out_models_environments_and_results():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*"  # everything is left out but what is named
    named = [line[1:] for line in ignore if line.startswith("!")]
    assert sorted(named) == sorted(
        [
            "optimize.py",
            "test_script.py",
            "LICENSE",
            "NOTICE",
            "LICENSES/",
            "orinfer/",
            "data/",
            "docker/requirements-jetson.lock",
        ]
    )
    assert "bench" not in " ".join(
        named
    )  # OpenBookQA's test split, on which defaults were tuned, stays out
    copied = re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.MULTILINE)
    assert all(
        path.rstrip("/") in {n.rstrip("/") for n in named}
        for line in copied
        for path in line.split()
    )


def test_the_image_the_docs_and_the_lock_name_the_same_artefacts():
    """The wheel NVIDIA publishes (versioned name), the libraries it links against, the build's checks, the
    entrypoint that takes --data, and docs/JETSON.md's commands naming the very same files."""
    jetson = (ROOT / "docs" / "JETSON.md").read_text()
    url = re.search(r"^ARG TORCH_WHEEL=(\S+)$", DOCKERFILE, re.MULTILINE).group(1)
    cusparselt = re.search(r"^ARG CUSPARSELT=(\S+)$", DOCKERFILE, re.MULTILINE).group(1)
    assert url.endswith("/" + TORCH_WHEEL) and url in jetson and cusparselt in jetson
    assert (
        "libopenmpi-dev" in DOCKERFILE and "libomp-dev" in DOCKERFILE
    )  # what the wheel links against
    assert "ldd" in DOCKERFILE and "sm_87" in DOCKERFILE and "ARTEFACTS.sha256" in DOCKERFILE
    assert (
        'ENTRYPOINT ["python3", "/orinfer/test_script.py", "--model", "/models/Phi-3-medium-4k-instruct"]'
        in DOCKERFILE
    )
    assert (
        "orinfer:jp60 --data /data/private.jsonl" in jetson
        and "orinfer:jp60 --self-check" in jetson
    )
    version = TORCH_WHEEL.split("-")[1].split("a0")[0]  # 2.3.0: the minor CI's JetPack stack tests
    assert re.search(rf'"torch=={version[:3]}\.\d+"', (ROOT / "tests" / "run.sh").read_text())
