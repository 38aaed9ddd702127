"""`bench sweep`: server per setting, CSV + JSON of all runs, real PNG plots of the same numbers."""

from __future__ import annotations

import csv
import json
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from bench_cli import run_cli
from PIL import Image

from hybridserve.bench.plots import frontier_figure, frontier_series, ttft_figure, ttft_series
from hybridserve.bench.sweep import best_setting, summary_row

FAKE_SERVER = Path(__file__).parent / "fake_server.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def check_png(path: Path) -> dict:
    """A real PNG of a sensible size; returns the series it says it plots."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size[0] >= 400 and image.size[1] >= 300
        return json.loads(image.text["Description"])


def test_sweep_starts_a_server_per_concurrency(tokenizer_dir, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    server_cmd = (
        f"{sys.executable} {FAKE_SERVER} --port {{port}} --tokenizer {tokenizer_dir} "
        "--max-num-seqs {concurrency} --token-delay 0.002"
    )
    code, out, err = run_cli(
        ["sweep", "--concurrencies", "1,2,4", "--server-cmd", server_cmd, "--tokenizer", str(tokenizer_dir),
         "--num-prompts", "8", "--random-input-len", "8", "--random-output-len", "6", "--disable-tqdm",
         "--output-dir", str(out_dir), "--slo-tpot-ms", "1000", "--metric-percentiles", "50,99"],
        capsys,
    )  # fmt: skip
    assert code == 0, err

    rows = read_csv(out_dir / "sweep.csv")
    assert [int(r["concurrency"]) for r in rows] == [1, 2, 4]
    assert all(int(r["completed"]) == 8 and int(r["failed"]) == 0 and r["error"] == "" for r in rows)
    summary = json.loads((out_dir / "sweep.json").read_text())
    assert summary["axis"] == "concurrency" and summary["values"] == [1, 2, 4]
    for row, run in zip(rows, summary["runs"]):
        result = run["result"]
        c = run["concurrency"]
        assert result["max_concurrency"] == c
        assert result["server_model"]["max_num_seqs"] == c  # the server flag followed the client
        assert 1 <= result["max_concurrent_requests"] <= c
        assert result["total_output_tokens"] == 8 * 6
        assert float(row["output_throughput"]) == pytest.approx(result["output_throughput"])
        assert float(row["median_tpot_ms"]) == pytest.approx(result["median_tpot_ms"])
        assert (out_dir / f"run-concurrency-{c}.json").exists()
        assert (out_dir / f"server-concurrency-{c}.log").exists()
        with pytest.raises(OSError):  # stopped after its run
            url = urlsplit(result["base_url"])
            socket.create_connection((url.hostname, url.port), timeout=1).close()

    frontier = check_png(out_dir / "throughput_vs_tpot.png")
    assert frontier["setting"] == [1, 2, 4]
    assert frontier["output_throughput"] == pytest.approx([float(r["output_throughput"]) for r in rows])
    assert frontier["median_tpot_ms"] == pytest.approx([float(r["median_tpot_ms"]) for r in rows])
    ttft = check_png(out_dir / "ttft_vs_concurrency.png")
    assert ttft["median_ttft_ms"] == pytest.approx([float(r["median_ttft_ms"]) for r in rows])
    assert ttft["p99_ttft_ms"] == pytest.approx([float(r["p99_ttft_ms"]) for r in rows])

    best = max(rows, key=lambda r: float(r["output_throughput"]))
    assert summary["best"]["concurrency"] == int(best["concurrency"])
    assert f"concurrency={best['concurrency']}:" in out


def test_sweep_over_request_rates_against_a_running_server(fake_server, tokenizer_dir, tmp_path, capsys):
    out_dir = tmp_path / "rates"
    with fake_server() as server:
        code, out, err = run_cli(
            ["sweep", "--request-rates", "50,200", "--base-url", server.base_url, "--tokenizer", str(tokenizer_dir),
             "--num-prompts", "6", "--random-input-len", "8", "--random-output-len", "3", "--disable-tqdm",
             "--output-dir", str(out_dir), "--slo-ttft-ms", "0.000001", "--percentile-metrics", "e2el"],
            capsys,
        )  # fmt: skip
    assert code == 0, err
    rows = read_csv(out_dir / "sweep.csv")
    assert [float(r["request_rate"]) for r in rows] == [50.0, 200.0]
    assert check_png(out_dir / "ttft_vs_request_rate.png")["setting"] == [50.0, 200.0]
    assert all(float(r["median_tpot_ms"]) > 0 for r in rows)  # measured even if not asked for
    assert check_png(out_dir / "throughput_vs_tpot.png")["median_tpot_ms"] == pytest.approx(
        [float(r["median_tpot_ms"]) for r in rows]
    )
    assert "No setting meets median ttft <= 1e-06 ms" in out  # an impossible SLO is reported as such


def test_sweep_reports_a_server_that_never_gets_ready(tokenizer_dir, tmp_path, capsys):
    out_dir = tmp_path / "broken"
    code, out, err = run_cli(
        ["sweep", "--concurrencies", "2", "--server-cmd", f"{sys.executable} -c 'import sys; sys.exit(3)'",
         "--tokenizer", str(tokenizer_dir), "--num-prompts", "2", "--output-dir", str(out_dir)],
        capsys,
    )  # fmt: skip
    assert code != 0
    assert "server exited with code 3" in err
    assert "Traceback" not in out + err
    rows = read_csv(out_dir / "sweep.csv")
    assert rows[0]["completed"] == "0" and "exited with code 3" in rows[0]["error"]


def row(c, throughput, tpot, ttft, failed=0):
    result = {"completed": 10, "failed": failed, "output_throughput": throughput, "median_tpot_ms": tpot,
              "median_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft, "first_errors": ["x"] * failed}  # fmt: skip
    return summary_row("concurrency", c, result)


def test_best_setting_is_the_fastest_that_meets_the_slos():
    rows = [row(1, 100.0, 10.0, 50.0), row(8, 600.0, 30.0, 200.0), row(64, 900.0, 80.0, 900.0),
            row(128, 2000.0, 20.0, 10.0, failed=1)]  # fmt: skip
    assert best_setting(rows)["concurrency"] == 64  # the failed run never wins
    assert best_setting(rows, slo_tpot_ms=50)["concurrency"] == 8
    assert best_setting(rows, slo_tpot_ms=50, slo_ttft_ms=100)["concurrency"] == 1
    assert best_setting(rows, slo_ttft_ms=300, stat="p99")["concurrency"] == 1
    assert best_setting(rows, slo_tpot_ms=5) is None


def test_figures_plot_exactly_the_series():
    rows = [row(1, 100.0, 10.0, 50.0), row(4, 350.0, 12.5, 80.0), {"concurrency": 8, "completed": 0}]
    frontier = frontier_series(rows, "concurrency")
    assert frontier == {"setting": [1, 4], "median_tpot_ms": [10.0, 12.5], "output_throughput": [100.0, 350.0]}
    line = frontier_figure(frontier, "concurrency").axes[0].lines[0]
    assert line.get_xydata().tolist() == [[10.0, 100.0], [12.5, 350.0]]
    series = ttft_series(rows, "concurrency")
    lines = ttft_figure(series, "concurrency").axes[0].lines
    assert [ln.get_ydata().tolist() for ln in lines] == [[50.0, 80.0], [100.0, 160.0]]
    assert lines[0].get_xdata().tolist() == [1, 4]
