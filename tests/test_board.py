"""orinfer/board.py against fake Jetson boards (tests/data/jetson/README.md): MAXN with pinned clocks, the 30 W mode,
and MAXN with clocks left to DVFS; and a machine that is no Jetson."""

from pathlib import Path

import pytest

from orinfer.board import datasheet, parse_l4t, parse_nvpmodel, read_jetson

BOARDS = Path(__file__).parent / "data" / "jetson"


def board(name: str):
    return read_jetson(BOARDS / name, (BOARDS / name / "nvpmodel-q.txt").read_text())


@pytest.mark.unit
def test_a_board_in_maxn_with_jetson_clocks():
    b = board("maxn")
    assert (b.model, b.l4t, b.power_mode, b.power_mode_id) == (
        "NVIDIA Jetson AGX Orin Developer Kit",
        "R36.3.0",
        "MAXN",
        0,
    )
    assert (b.gpu_freq, b.gpu_max_freq, b.clocks_pinned) == (930_750_000, 930_750_000, True)


@pytest.mark.unit
def test_the_30w_mode_and_clocks_left_to_dvfs():
    thirty = board("30w")
    assert (thirty.power_mode, thirty.power_mode_id, thirty.gpu_max_freq) == ("30W", 2, 612_000_000)
    unpinned = board("unpinned")
    assert (
        unpinned.power_mode == "MAXN"
        and unpinned.clocks_pinned is False
        and unpinned.gpu_freq == 306_000_000
    )


@pytest.mark.unit
def test_no_jetson_and_unreadable_answers(tmp_path):
    assert read_jetson(tmp_path, "") is None  # no /etc/nv_tegra_release
    assert parse_nvpmodel(None) == (None, None) and parse_nvpmodel("garbage") == (None, None)
    assert (
        parse_l4t("# R35 (release), REVISION: 4.1, GCID: 1") == "R35.4.1" and parse_l4t("") is None
    )
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 2.0\n")
    b = read_jetson(tmp_path, "")  # a Jetson whose GPU folder and nvpmodel this process cannot read
    assert (
        b.l4t == "R36.2.0"
        and b.power_mode is None
        and b.gpu_max_freq is None
        and b.clocks_pinned is None
    )


@pytest.mark.unit
def test_datasheets_known_by_device_name():
    assert datasheet("Orin") == (26.69e12, 204.8e9) and datasheet("NVIDIA H200")[1] == 4.8e12
    assert datasheet("NVIDIA GeForce RTX 4090") is None


@pytest.mark.unit
def test_the_module_is_named_and_its_peak_computed_from_sms_and_clock():
    production, devkit = board("maxn"), board("devkit-0000")
    assert production.module == "p3701-0004" and devkit.module == "p3701-0000"
    assert production.peak_flops(14) == pytest.approx(26.69e12, rel=1e-3)
    assert devkit.peak_flops(16) == pytest.approx(42.6e12, rel=1e-3)
    assert production.temperature == 47.5
    assert production.slow_reasons(14) == [] and devkit.slow_reasons(16) == []
    line = production.describe(14)
    assert (
        line.startswith(
            "board: AGX Orin 32GB, P3701-0004, 14 SMs, GPU 931 of 931 MHz, power mode MAXN, clocks "
            "pinned, 48 C, L4T R36.3.0, bf16 peak 26.7 TFLOP/s"
        )
        and "\n" not in line
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, sms, reasons",
    [
        (
            "30w",
            8,
            [
                "power mode 30W, not MAXN",
                "GPU clock capped at 612 MHz (MAXN: 931)",
                "8 of the module's 14 SMs on",
            ],
        ),
        ("container-30w", 14, ["GPU clock capped at 612 MHz (MAXN: 931)"]),
        ("unpinned", 14, ["clocks not pinned (they ramp up under load)"]),
    ],
)
def test_a_board_below_full_speed_says_so_loudly_in_a_container_too(name, sms, reasons):
    b = board(name)
    assert b.slow_reasons(sms) == reasons
    first, loud = b.describe(sms).split("\n")
    assert loud.startswith("!! NOT AT FULL SPEED: ") and "sudo nvpmodel -m 0" in loud
    if name == "container-30w":
        assert b.in_container and b.l4t is None and b.power_mode is None
        assert "power mode unread (no nvpmodel here)" in first and "in a container" in first
        assert b.peak_flops(8) == pytest.approx(8 * 2048 * 612e6)


@pytest.mark.unit
def test_environment_settings_that_change_the_plan_are_named():
    from orinfer.board import environment_notes

    assert environment_notes({}, board("maxn")) == []
    notes = environment_notes(
        {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync", "CUDA_MODULE_LOADING": "EAGER"},
        board("maxn"),
    )
    assert [v for v, _ in notes] == ["warn", "warn"] and "unset it" in notes[0][1]
    old = read_jetson(BOARDS / "maxn", "")
    old = type(old)(**{**old.__dict__, "l4t": "R35.4.1"})
    assert environment_notes({}, old) == [
        ("warn", "L4T R35.4.1: JetPack 6.0 is L4T R36.3; this release is untested here")
    ]
