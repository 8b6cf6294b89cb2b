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
    assert (b.model, b.l4t, b.power_mode, b.power_mode_id) == ("NVIDIA Jetson AGX Orin Developer Kit", "R36.3.0",
                                                               "MAXN", 0)
    assert (b.gpu_freq, b.gpu_max_freq, b.clocks_pinned) == (930_750_000, 930_750_000, True)


@pytest.mark.unit
def test_the_30w_mode_and_clocks_left_to_dvfs():
    thirty = board("30w")
    assert (thirty.power_mode, thirty.power_mode_id, thirty.gpu_max_freq) == ("30W", 2, 612_000_000)
    unpinned = board("unpinned")
    assert unpinned.power_mode == "MAXN" and unpinned.clocks_pinned is False and unpinned.gpu_freq == 306_000_000


@pytest.mark.unit
def test_no_jetson_and_unreadable_answers(tmp_path):
    assert read_jetson(tmp_path, "") is None  # no /etc/nv_tegra_release
    assert parse_nvpmodel(None) == (None, None) and parse_nvpmodel("garbage") == (None, None)
    assert parse_l4t("# R35 (release), REVISION: 4.1, GCID: 1") == "R35.4.1" and parse_l4t("") is None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 2.0\n")
    b = read_jetson(tmp_path, "")  # a Jetson whose GPU folder and nvpmodel this process cannot read
    assert b.l4t == "R36.2.0" and b.power_mode is None and b.gpu_max_freq is None and b.clocks_pinned is None


@pytest.mark.unit
def test_datasheets_known_by_device_name():
    assert datasheet("Orin") == (26.69e12, 204.8e9) and datasheet("NVIDIA H200")[1] == 4.8e12
    assert datasheet("NVIDIA GeForce RTX 4090") is None
