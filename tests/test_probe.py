"""probe-disk: a quick run on tmp_path produces a sane table, JSON and a loadable profile."""

from __future__ import annotations

import argparse
import json
import warnings
import math
from pathlib import Path

import numpy as np
import pytest

from llmflash.runtime.kernel_aio import kernel_aio_available

from llmflash.errors import LLMFlashError
from llmflash.tools import probe_disk as probe
from llmflash.runtime.read_planner import PROFILE_ENV, DeviceProfile, load_default_profile
from llmflash.cli.probe_disk import add_arguments
from llmflash.cli.probe_disk import size_arg as parse_size
from llmflash.tools.probe_disk import Cell, fit_profile


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("reader", ["threads", pytest.param("aio", marks=pytest.mark.skipif(
    not kernel_aio_available(), reason="kernel AIO unavailable"))])
def test_quick_probe_writes_json_and_saves_a_loadable_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], reader: str
) -> None:
    if reader == "aio":
        from llmflash.runtime.reader import FlashFile

        (tmp_path / "probe-o-direct").write_bytes(b"\0" * 4096)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warning, if any: we skip instead
            with FlashFile(tmp_path / "probe-o-direct") as f:
                if not f.direct:
                    pytest.skip(f"{tmp_path} refuses O_DIRECT")
    profile_path = tmp_path / "cache" / "device_profile.json"
    monkeypatch.setenv(PROFILE_ENV, str(profile_path))
    report_path = tmp_path / "probe.json"

    assert probe.run(_args(str(tmp_path), "--quick", "--json", str(report_path), "--reader", reader)) == 0

    report = json.loads(report_path.read_text())
    assert report["reader"] == reader and report["profile"]["source"].endswith(f"({reader})")
    assert {"cells", "profile", "fit", "direct", "file_size", "saved_to"} <= report.keys()
    assert len(report["cells"]) == len(probe.QUICK.chunks) * len(probe.QUICK.depths)
    for cell in report["cells"]:
        assert cell["reads"] >= 1 and cell["mb_per_s"] > 0 and cell["us_per_read"] > 0
    fitted = report["profile"]
    for key in ("a_us", "s0_us", "bandwidth_Bps"):
        assert math.isfinite(fitted[key]) and fitted[key] > 0
    assert report["saved_to"] == str(profile_path)
    loaded = load_default_profile()
    assert loaded.a_us == pytest.approx(fitted["a_us"]) and loaded.bandwidth_Bps == pytest.approx(fitted["bandwidth_Bps"])
    assert not list(tmp_path.glob(".llmflash-probe-*")), "scratch file was not deleted"
    out = capsys.readouterr().out
    assert "MB/s" in out and "fit: time per read" in out


def test_probe_of_an_existing_file_keeps_it_and_can_skip_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "never.json"))
    data = tmp_path / "data.bin"
    data.write_bytes(np.random.default_rng(0).bytes(2 << 20))
    args = _args("--file", str(data), "--chunks", "4K,64K", "--depths", "1,8", "--seconds", "0.02",
                 "--max-reads", "64", "--no-save")
    assert probe.run(args) == 0
    assert data.exists() and not (tmp_path / "never.json").exists()


def test_fit_recovers_a_known_model() -> None:
    truth = DeviceProfile(a_us=54.0, s0_us=10.7, bandwidth_Bps=1.19e9)
    cells = [
        Cell(chunk, depth, 1000, 1000 * (truth.a_us / depth + truth.s0_us + chunk / truth.bandwidth_Bps * 1e6) * 1e-6)
        for chunk in probe.FULL_CHUNKS for depth in probe.FULL_DEPTHS
    ]
    fitted, quality = fit_profile(cells)
    assert fitted.a_us == pytest.approx(54.0, rel=1e-6)
    assert fitted.s0_us == pytest.approx(10.7, rel=1e-6)
    assert fitted.bandwidth_Bps == pytest.approx(1.19e9, rel=1e-6)
    assert quality["median_rel_error"] < 1e-9


def test_fit_stays_positive_when_data_says_a_term_is_zero() -> None:
    cells = [Cell(chunk, depth, 100, 100 * (5.0 + chunk / 1e3) * 1e-6) for chunk in (4096, 65536) for depth in (1, 8)]
    fitted, _ = fit_profile(cells)
    assert fitted.a_us > 0 and fitted.s0_us > 0 and math.isfinite(fitted.bandwidth_Bps)


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(LLMFlashError, match="does not exist"):
        probe.run(_args(str(tmp_path / "missing"), "--quick", "--no-save"))
    with pytest.raises(LLMFlashError, match="not an existing file"):
        probe.run(_args("--file", str(tmp_path / "nope.bin"), "--quick", "--no-save"))
    with pytest.raises(LLMFlashError, match="multiples of 512"):
        probe.run(_args(str(tmp_path), "--quick", "--chunks", "1000", "--no-save"))


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(LLMFlashError, match="pip install matplotlib"):
            probe.run(_args(str(tmp_path), "--quick", "--no-save", "--plot", str(tmp_path / "p.png")))
        assert not list(tmp_path.glob(".llmflash-probe-*"))
    else:
        args = _args(str(tmp_path), "--quick", "--no-save", "--plot", str(tmp_path / "p.png"))
        assert probe.run(args) == 0 and (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("text, expected", [("4096", 4096), ("4K", 4096), ("16MiB", 16 << 20), ("1G", 1 << 30), ("1.5k", 1536)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
