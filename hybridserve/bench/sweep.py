"""`hybridserve bench sweep`: `bench serve` over several concurrencies (or request rates).

Optionally starts the server once per setting from a template (`{port}`, `{concurrency}`,
`{request_rate}`), waits for `GET /health` == 200, and stops it with SIGTERM afterwards, so a
server flag such as `--max-num-seqs` can follow the client concurrency. Writes one CSV and one
JSON of all runs, the plots, and prints the highest-throughput setting meeting the SLOs.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from hybridserve.bench.plots import write_sweep_plots
from hybridserve.bench.serve import BenchError, run_benchmark, server_urls

CSV_FIELDS = (
    "completed", "failed", "duration", "request_throughput", "output_throughput",
    "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
    "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "error",
)  # fmt: skip


def parse_values(text: str, cast) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"cannot parse sweep values {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise BenchError(f"sweep values must be positive, got {text!r}")
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    """A server process for one setting: started, awaited on /health, stopped with SIGTERM."""

    def __init__(
        self, command: str, base_url: str, log_path: Path, ready_timeout: float, stop_grace_s: float = 30.0
    ) -> None:
        self.command, self.base_url, self.log_path = command, base_url, log_path
        self.ready_timeout, self.stop_grace_s = ready_timeout, stop_grace_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ManagedServer:
        print(f"Starting server: {self.command}")
        with open(self.log_path, "wb") as log:
            try:
                self.process = subprocess.Popen(
                    shlex.split(self.command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as e:
                raise BenchError(f"cannot start server {self.command!r}: {e}") from None
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: no proxy
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"server exited with code {self.process.returncode} before it was ready; "
                    f"last log lines ({self.log_path}):\n{self._log_tail()}"
                )
            try:
                with direct.open(f"{self.base_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise BenchError(f"server not healthy after {self.ready_timeout:.0f} s; log: {self.log_path}")

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it if it is still there after the grace time."""
        if self.process is None:
            return
        try:  # the whole group: a server may have started workers of its own
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(self.stop_grace_s)
        except ProcessLookupError:  # already gone: just reap it
            self.process.wait()
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


def summary_row(axis: str, value: float, result: dict | None, error: str = "") -> dict:
    """One CSV row: the setting, the headline numbers, and why it failed if it did."""
    row = {axis: value} | {f: (result or {}).get(f, "") for f in CSV_FIELDS}
    row["completed"] = row["completed"] or 0
    if result and result["failed"]:
        error = error or f"{result['failed']} requests failed: {result['first_errors'][0]}"
    row["error"] = error
    return row


def meets_slos(row: dict, slo_tpot_ms: float | None, slo_ttft_ms: float | None, stat: str) -> bool:
    for metric, limit in (("tpot", slo_tpot_ms), ("ttft", slo_ttft_ms)):
        if limit is not None:
            value = row.get(f"{stat}_{metric}_ms")
            if value in (None, "") or value > limit:
                return False
    return True


def best_setting(rows: list[dict], slo_tpot_ms=None, slo_ttft_ms=None, stat: str = "median") -> dict | None:
    """Highest output throughput among clean runs (no failed request) that meet every SLO."""
    clean = [r for r in rows if r["completed"] and not r["failed"] and not r["error"]]
    good = [r for r in clean if meets_slos(r, slo_tpot_ms, slo_ttft_ms, stat)]
    return max(good, key=lambda r: r["output_throughput"], default=None)


def run_one(args, axis: str, value, out_dir: Path) -> tuple[dict | None, str]:
    """One `bench serve` run at this setting (server started around it if asked)."""
    run_args = argparse.Namespace(**vars(args))
    setattr(run_args, "max_concurrency" if axis == "concurrency" else "request_rate", value)
    run_args.save_result, run_args.result_dir = True, str(out_dir)
    run_args.result_filename = f"run-{axis}-{value:g}.json"
    chosen = [m for m in args.percentile_metrics.split(",") if m]
    run_args.percentile_metrics = ",".join(dict.fromkeys(["ttft", "tpot", "itl", *chosen]))  # the CSV needs them
    try:
        if not args.server_cmd:
            return asyncio.run(run_benchmark(run_args)), ""
        port = free_port() if "{port}" in args.server_cmd else args.port
        if "{port}" in args.server_cmd:
            run_args.base_url = f"http://127.0.0.1:{port}"
        base_url, _ = server_urls(run_args)
        command = args.server_cmd.format(
            port=port, concurrency=run_args.max_concurrency, request_rate=run_args.request_rate
        )
        log_path = out_dir / f"server-{axis}-{value:g}.log"
        with ManagedServer(command, base_url, log_path, args.server_ready_timeout):
            return asyncio.run(run_benchmark(run_args)), ""
    except BenchError as e:
        print(f"error at {axis}={value:g}: {e}", file=sys.stderr)
        return None, str(e)


def write_outputs(rows: list[dict], runs: list[dict], summary: dict, axis: str, out_dir: Path) -> None:
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[axis, *CSV_FIELDS])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "sweep.json").write_text(json.dumps(summary | {"rows": rows, "runs": runs}, indent=1))


def format_best(best: dict | None, axis: str, stat: str, slos: dict) -> str:
    wanted = ", ".join(f"{stat} {k} <= {v:g} ms" for k, v in slos.items() if v is not None) or "no SLO"
    if best is None:
        return f"No setting meets {wanted} without failed requests."
    return (
        f"Best setting ({wanted}): {axis}={best[axis]:g}: {best['output_throughput']:.2f} output tok/s, "
        f"median TPOT {best['median_tpot_ms']:.2f} ms, median TTFT {best['median_ttft_ms']:.2f} ms"
    )


def main(args) -> int:
    """CLI entry of `bench sweep`: 0 when every setting ran without failed requests."""
    axis = "concurrency" if args.concurrencies else "request_rate"
    try:
        values = parse_values(args.concurrencies, int) if args.concurrencies else parse_values(args.request_rates, float)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    try:
        for value in values:
            print(f"\n=== sweep: {axis} = {value:g} ===")
            result, error = run_one(args, axis, value, out_dir)
            rows.append(summary_row(axis, value, result, error))
            runs.append({axis: value, "result": result, "error": error})
    except KeyboardInterrupt:
        print("error: interrupted; no sweep summary written", file=sys.stderr)
        return 130

    slos = {"tpot": args.slo_tpot_ms, "ttft": args.slo_ttft_ms}
    best = best_setting(rows, args.slo_tpot_ms, args.slo_ttft_ms, args.slo_stat)
    summary = {"axis": axis, "values": values, "slo": slos | {"stat": args.slo_stat}, "best": best}
    write_outputs(rows, runs, summary, axis, out_dir)
    plots = write_sweep_plots(rows, axis, out_dir)

    print(f"\n{axis:>14} {'out tok/s':>12} {'med TPOT ms':>12} {'med TTFT ms':>12} {'failed':>7}")
    for row in rows:
        if row["completed"]:
            print(f"{row[axis]:>14g} {row['output_throughput']:>12.2f} {row['median_tpot_ms']:>12.2f} "
                  f"{row['median_ttft_ms']:>12.2f} {row['failed']:>7}")
        else:
            print(f"{row[axis]:>14g} {'run failed: ' + row['error'].splitlines()[0]}")
    print(format_best(best, axis, args.slo_stat, slos))
    print(f"Wrote {out_dir / 'sweep.csv'}, {out_dir / 'sweep.json'}" + "".join(f", {p}" for p in plots))
    failed = [r for r in rows if r["error"] or not r["completed"]]
    return 1 if failed else 0

