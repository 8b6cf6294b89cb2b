"""What the machine is, for the self-check (selfcheck.py): on a Jetson its model, L4T release, power mode (nvpmodel)
and GPU clock (devfreq in sysfs), and the datasheet rates of the devices the project knows. Everything is read from
files under `root` (default /) and from `nvpmodel -q`'s output, so that tests can hand in a fake board (tests/data/
jetson/). Where to look follows NVIDIA's Jetson Linux Developer Guide ("Platform Power and Performance": nvpmodel,
jetson_clocks, devfreq) and jetson-stats (https://github.com/rbonghi/jetson_stats, AGPL-3.0; read, not copied).
"""
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Dense bf16 tensor FLOP/s and DRAM bytes/s of devices the project targets or measures on (datasheets: REFERENCE.md
# section 7 for the Orin: 14 SMs x 930.75 MHz x 2,048 bf16 FLOP a clock; NVIDIA's H200 datasheet).
DATASHEET = {"orin": (26.69e12, 204.8e9), "h200": (989e12, 4.8e12)}
# What published measurements reach of the datasheet on an Orin (REFERENCE.md section 7): ~79 % and ~75 %. Below
# half of the datasheet something is wrong (a power mode, clocks, another process).
MEASURED_SHARE = (0.79, 0.75)


@dataclass(frozen=True)
class Jetson:
    model: str                   # /proc/device-tree/model
    l4t: str | None              # "R36.3.0" from /etc/nv_tegra_release
    power_mode: str | None       # nvpmodel -q: the mode's name ("MAXN", "30W", ...)
    power_mode_id: int | None
    gpu_freq: int | None         # Hz, devfreq's cur_freq
    gpu_max_freq: int | None     # Hz, the highest the power mode allows (max_freq)
    gpu_min_freq: int | None     # Hz; jetson_clocks pins it to max_freq

    @property
    def clocks_pinned(self) -> bool | None:
        if self.gpu_min_freq is None or self.gpu_max_freq is None:
            return None
        return self.gpu_min_freq >= self.gpu_max_freq


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip("\x00 \n")
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    return int(text) if text and text.isdigit() else None


def nvpmodel_query() -> str | None:
    """`nvpmodel -q`'s output, or None where there is no nvpmodel (not a Jetson, or not on PATH)."""
    try:
        return subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def parse_nvpmodel(text: str | None) -> tuple[str | None, int | None]:
    """'NV Power Mode: MAXN' and the mode's number on the next line -> ("MAXN", 0)."""
    if not text:
        return None, None
    name = re.search(r"NV Power Mode:\s*(\S+)", text)
    number = re.search(r"^\s*(\d+)\s*$", text, re.M)
    return (name.group(1) if name else None), (int(number.group(1)) if number else None)


def parse_l4t(text: str | None) -> str | None:
    """'# R36 (release), REVISION: 3.0, ...' -> 'R36.3.0'."""
    found = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text or "")
    return f"R{found.group(1)}.{found.group(2)}" if found else None


def gpu_devfreq(root: Path) -> Path | None:
    """The GPU's devfreq folder: the Orin's GPU sits at 17000000 (named ...ga10b or ...gpu by release)."""
    folder = root / "sys" / "class" / "devfreq"
    found = sorted(p for p in folder.glob("*") if p.name.startswith("17000000.") or p.name.endswith(("ga10b", "gpu")))
    return found[0] if found else None


def read_jetson(root: Path = Path("/"), nvpmodel: str | None = None) -> Jetson | None:
    """The Jetson's facts, or None where this is no Jetson (no /etc/nv_tegra_release). `nvpmodel`: `nvpmodel -q`'s
    output (default: run it)."""
    release = _read(root / "etc" / "nv_tegra_release")
    if release is None:
        return None
    mode, mode_id = parse_nvpmodel(nvpmodel if nvpmodel is not None else nvpmodel_query())
    gpu = gpu_devfreq(root)
    freq = {name: _int(gpu / name) if gpu else None for name in ("cur_freq", "max_freq", "min_freq")}
    return Jetson(model=_read(root / "proc" / "device-tree" / "model") or "Jetson (model unknown)",
                  l4t=parse_l4t(release), power_mode=mode, power_mode_id=mode_id, gpu_freq=freq["cur_freq"],
                  gpu_max_freq=freq["max_freq"], gpu_min_freq=freq["min_freq"])


def datasheet(device_name: str) -> tuple[float, float] | None:
    """(bf16 FLOP/s, DRAM bytes/s) for a device the project knows by its CUDA name, else None."""
    name = device_name.lower()
    if "orin" in name:
        return DATASHEET["orin"]
    if "h200" in name:
        return DATASHEET["h200"]
    return None
