"""What the machine is, for every run's Section 1 and the self-check: on a Jetson its module
(P3701-0000 or -0004, from the device tree), L4T release, power mode (nvpmodel), GPU clock (devfreq
in sysfs) and temperature, also in a container without nvpmodel or /etc/nv_tegra_release; the
settings of the environment that change the memory plan; and the peak rates of the devices the
project knows. Everything is read from files under `root` (default /) and from `nvpmodel -q`'s
output, so that tests can hand in a fake board (tests/data/jetson/). Where to look follows NVIDIA's
Jetson Linux Developer Guide ("Platform Power and Performance": nvpmodel, jetson_clocks, devfreq)
and jetson-stats (https://github.com/rbonghi/jetson_stats, AGPL-3.0; read, not copied).
"""

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Dense bf16 tensor FLOP/s and DRAM bytes/s of devices the project targets or measures on
# (datasheets: REFERENCE.md section 7 for the Orin: 14 SMs x 930.75 MHz x 2,048 bf16 FLOP a clock;
# NVIDIA's H200 datasheet).
DATASHEET = {"orin": (26.69e12, 204.8e9), "h200": (989e12, 4.8e12)}
# bf16 dense, Ampere sm_87 (REFERENCE.md section 8: peak = SMs x 2,048 x clock)
ORIN_FLOP_PER_SM_CLOCK = 2048
ORIN_DRAM_BYTES = 204.8e9
# The Orin modules by the part number in /proc/device-tree/compatible: name, SMs and GPU clock in
# MAXN (NVIDIA's nvpmodel_p3701_0000/0004/0005 configurations; REFERENCE.md section 8).
MODULES = {
    "p3701-0000": ("AGX Orin 32GB, the developer kit's module P3701-0000", 16, 1_300_500_000),
    "p3701-0004": ("AGX Orin 32GB, P3701-0004", 14, 930_750_000),
    "p3701-0005": ("AGX Orin 64GB, P3701-0005", 16, 1_300_500_000),
}
HOT_CELSIUS = 85  # the GPU throttles near its limit (thermal zones trip from ~97 C)
# What published measurements reach of the datasheet on an Orin (REFERENCE.md section 7): ~79 % and
# ~75 %. Below half of the datasheet something is wrong (a power mode, clocks, another process).
MEASURED_SHARE = (0.79, 0.75)


@dataclass(frozen=True)
class Jetson:
    model: str  # /proc/device-tree/model
    # "R36.3.0" from /etc/nv_tegra_release (None in a container that lacks it)
    l4t: str | None
    power_mode: str | None  # nvpmodel -q: the mode's name ("MAXN", "30W", ...)
    power_mode_id: int | None
    gpu_freq: int | None  # Hz, devfreq's cur_freq
    gpu_max_freq: int | None  # Hz, the highest the power mode allows (max_freq)
    gpu_min_freq: int | None  # Hz; jetson_clocks pins it to max_freq
    module: str | None = None  # "p3701-0004", from /proc/device-tree/compatible
    temperature: float | None = None  # the GPU's thermal zone, degrees Celsius
    # no /etc/nv_tegra_release: the facts come from sysfs and the device tree alone
    in_container: bool = False

    @property
    def module_facts(self) -> tuple[str, int, int] | None:
        """(name, SMs, MAXN GPU clock in Hz) of a module the project knows."""
        return MODULES.get(self.module or "")

    def peak_flops(self, sms: int | None = None) -> float:
        """bf16 dense FLOP/s at the SMs and clock this board runs now (its MAXN figures where
        unread)."""
        name, module_sms, module_hz = self.module_facts or ("", 14, 930_750_000)
        return (sms or module_sms) * ORIN_FLOP_PER_SM_CLOCK * (self.gpu_max_freq or module_hz)

    def maxn_peak_flops(self) -> float:
        """bf16 dense FLOP/s of this module in MAXN (the 32 GB production module's where the module
        is unknown)."""
        _, sms, hz = self.module_facts or MODULES["p3701-0004"]
        return sms * ORIN_FLOP_PER_SM_CLOCK * hz

    def slow_reasons(self, sms: int | None = None) -> list[str]:
        """Why the GPU runs below the module's MAXN speed now; empty when it runs at full speed."""
        reasons = []
        facts = self.module_facts
        if self.power_mode is not None and not self.power_mode.startswith("MAXN"):
            reasons.append(f"power mode {self.power_mode}, not MAXN")
        if facts and self.gpu_max_freq and self.gpu_max_freq < 0.99 * facts[2]:
            reasons.append(
                f"GPU clock capped at {self.gpu_max_freq / 1e6:.0f} MHz (MAXN: "
                f"{facts[2] / 1e6:.0f})"
            )
        if facts and sms and sms < facts[1]:
            reasons.append(f"{sms} of the module's {facts[1]} SMs on")
        if self.clocks_pinned is False:
            reasons.append("clocks not pinned (they ramp up under load)")
        if self.temperature is not None and self.temperature >= HOT_CELSIUS:
            reasons.append(f"GPU at {self.temperature:.0f} C: it throttles")
        return reasons

    def describe(self, sms: int | None = None) -> str:
        """One line for Section 1: module, SMs, clock now and at most, power mode, pinned or not,
        temperature; and a loud second line with the fix when it runs below full speed."""
        name = (self.module_facts or (self.model,))[0]
        clock = (
            f"GPU {self.gpu_freq / 1e6:.0f} of {self.gpu_max_freq / 1e6:.0f} MHz"
            if self.gpu_freq and self.gpu_max_freq
            else "GPU clock unread"
        )
        parts = [
            f"board: {name}",
            f"{sms} SMs" if sms else None,
            clock,
            f"power mode {self.power_mode or 'unread (no nvpmodel here)'}",
            {True: "clocks pinned", False: "clocks not pinned", None: None}[self.clocks_pinned],
            f"{self.temperature:.0f} C" if self.temperature is not None else None,
            f"L4T {self.l4t}" if self.l4t else "in a container (no /etc/nv_tegra_release)",
            f"bf16 peak {self.peak_flops(sms) / 1e12:.1f} TFLOP/s",
        ]
        line = ", ".join(p for p in parts if p)
        reasons = self.slow_reasons(sms)
        if reasons:
            line += (
                "\n!! NOT AT FULL SPEED: "
                + "; ".join(reasons)
                + ". On the host: sudo nvpmodel -m 0 (MAXN), "
                "then sudo jetson_clocks; the timed run will be slower until then"
            )
        return line

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
    """The GPU's devfreq folder: the Orin's GPU sits at 17000000 (named ...ga10b or ...gpu by
    release)."""
    folder = root / "sys" / "class" / "devfreq"
    found = sorted(
        p
        for p in folder.glob("*")
        if p.name.startswith("17000000.") or p.name.endswith(("ga10b", "gpu"))
    )
    return found[0] if found else None


def parse_module(compatible: str | None) -> str | None:
    """'nvidia,p3737-0000+p3701-0004\\0nvidia,p3701-0004\\0nvidia,tegra234' -> 'p3701-0004' (the
    module, not the carrier board p3737)."""
    found = re.findall(r"p3701-\d{4}", compatible or "")
    return found[0] if found else None


def gpu_temperature(root: Path) -> float | None:
    """The GPU's thermal zone (type gpu-thermal), in degrees Celsius."""
    for zone in sorted((root / "sys" / "class" / "thermal").glob("thermal_zone*")):
        if _read(zone / "type") == "gpu-thermal":
            millidegrees = _int(zone / "temp")
            return millidegrees / 1000 if millidegrees is not None else None
    return None


def is_jetson(root: Path = Path("/")) -> bool:
    """A Tegra board: L4T's release file, or (in a container without it) a tegra device tree."""
    compatible = _read(root / "proc" / "device-tree" / "compatible") or ""
    return (root / "etc" / "nv_tegra_release").exists() or "tegra" in compatible


def read_jetson(root: Path = Path("/"), nvpmodel: str | None = None) -> Jetson | None:
    """The Jetson's facts, or None where this is no Jetson. `nvpmodel`: `nvpmodel -q`'s output
    (default: run it). In a container without nvpmodel or /etc/nv_tegra_release the facts come from
    sysfs and the device tree."""
    if not is_jetson(root):
        return None
    release = _read(root / "etc" / "nv_tegra_release")
    mode, mode_id = parse_nvpmodel(nvpmodel if nvpmodel is not None else nvpmodel_query())
    gpu = gpu_devfreq(root)
    freq = {
        name: _int(gpu / name) if gpu else None for name in ("cur_freq", "max_freq", "min_freq")
    }
    return Jetson(
        model=_read(root / "proc" / "device-tree" / "model") or "Jetson (model unknown)",
        l4t=parse_l4t(release),
        power_mode=mode,
        power_mode_id=mode_id,
        gpu_freq=freq["cur_freq"],
        gpu_max_freq=freq["max_freq"],
        gpu_min_freq=freq["min_freq"],
        module=parse_module(_read(root / "proc" / "device-tree" / "compatible")),
        temperature=gpu_temperature(root),
        in_container=release is None,
    )


def environment_notes(environ: dict, jetson: Jetson | None) -> list[tuple[str, str]]:
    """(verdict, line) for each setting of the environment that changes what the memory plan
    assumes."""
    notes = []
    conf = environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "cudaMallocAsync" in conf:
        notes.append(
            (
                "warn",
                f"PYTORCH_CUDA_ALLOC_CONF={conf}: the plan caps torch's native allocator, which "
                "this backend replaces: unset it",
            )
        )
    elif conf:
        notes.append(
            ("ok", f"PYTORCH_CUDA_ALLOC_CONF={conf} (the native allocator: the plan's cap holds)")
        )
    if environ.get("CUDA_MODULE_LOADING", "LAZY").upper() == "EAGER":
        notes.append(
            (
                "warn",
                "CUDA_MODULE_LOADING=EAGER loads every kernel module at start: host memory the "
                "plan does not book; unset it (lazy loading is CUDA's default)",
            )
        )
    if jetson is not None and jetson.l4t and not jetson.l4t.startswith("R36."):
        notes.append(
            ("warn", f"L4T {jetson.l4t}: JetPack 6.0 is L4T R36.3; this release is untested here")
        )
    return notes


def datasheet(device_name: str) -> tuple[float, float] | None:
    """(bf16 FLOP/s, DRAM bytes/s) for a device the project knows by its CUDA name, else None."""
    name = device_name.lower()
    if "orin" in name:
        return DATASHEET["orin"]
    if "h200" in name:
        return DATASHEET["h200"]
    return None
