"""``python -m bench.run --quick|--full``: every scenario in one run, results in bench/results and BENCHMARKS.md.

It starts a private redis-server (free port, no persistence), real `presence serve` processes and the seed
gateway, and drives them with real aiohttp WebSocket clients in separate processes. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report, scenarios
from bench.harness import machine_cpu_seconds
from bench.procs import ROOT, RedisServer, log, presence_command, raise_nofile

RESULTS = ROOT / "bench" / "results"
SCENARIOS = ("ceiling", "fanout", "query", "memory", "connections", "workers")


def machine() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in ("aiohttp", "redis", "hiredis", "uvloop", "msgspec")},
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def code_fingerprint() -> str:
    """sha256 of the code under test (presence/ and lua/): a change in the middle of a run is reported."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("presence/**/*.py"), *ROOT.glob("lua/*.lua")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_head() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        )
    except OSError:
        return None
    return out.stdout.strip() or None


async def main_async(mode: scenarios.Mode, only: list[str], command: str) -> dict[str, Any]:
    raise_nofile()
    before = machine_cpu_seconds()
    await asyncio.sleep(1.0)
    other_before = round(100 * (machine_cpu_seconds() - before) / 1.0, 1)
    load_before = os.getloadavg()
    started = time.time()
    t0 = time.monotonic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="presence-bench-logs-"))
    redis_server = RedisServer()
    redis_server.start()
    log(f"{mode.name} run: redis-server on port {redis_server.port}, logs in {logs}")
    ctx = scenarios.Context(mode, redis_server, RESULTS, logs)
    info = await ctx.admin.info("server")
    results: dict[str, Any] = {
        "meta": {
            "mode": mode.name,
            "command": command,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "machine": machine(),
            "redis_version": info["redis_version"],
            "redis_command": "redis-server --port PORT --bind 127.0.0.1 --save '' --appendonly no",
            "presence_command": "PRESENCE_APPS=10000:KEY "
            + shlex.join(["python", *presence_command("redis://127.0.0.1:PORT/0", 0, "NODE")[1:]]).replace(
                "--ws-port 0", "--ws-port PORT"
            ),
            "git_head": git_head(),
            "code_fingerprint": code_fingerprint(),
            "runs": mode.runs,
            "machine_busy_before_pct": other_before,
            "loadavg_before": [round(x, 2) for x in load_before],
            "mode_settings": {k: v for k, v in vars(mode).items()},
        },
    }
    try:
        for name in only:
            log(f"=== scenario {name} ===")
            try:
                if name == "fanout":
                    ours = await scenarios.fanout(ctx, "ours")
                    profile = ours.pop("profile", None)
                    try:
                        baseline = await scenarios.fanout(ctx, "baseline")
                    except Exception as exc:  # ours stays reported
                        log(f"scenario fanout (baseline) FAILED: {exc!r}")
                        traceback.print_exc()
                        baseline = {"error": repr(exc)}
                    results["fanout_gateway_log"] = {
                        "ours": ours.pop("gateway_log", None),
                        "baseline": baseline.pop("gateway_log", None),
                    }
                    fan: dict[str, Any] = {}
                    for size, value in ours.items():
                        value["baseline"] = baseline.get(size) if "error" not in baseline else None
                        b = (value["baseline"] or {}).get("deliveries_per_s")
                        if b and value.get("deliveries_per_s"):
                            value["ratio_deliveries_vs_baseline"] = round(value["deliveries_per_s"] / b, 2)
                        fan[size] = value
                    results["fanout"] = fan
                    if profile is not None:
                        results["profile"] = profile
                else:
                    results[name] = await getattr(scenarios, name)(ctx)
            except Exception as exc:
                log(f"scenario {name} FAILED: {exc!r}")
                traceback.print_exc()
                results[name] = {"error": repr(exc)}
    finally:
        await ctx.admin.aclose()
        redis_server.stop()
    results["meta"]["duration_s"] = round(time.monotonic() - t0, 1)
    results["meta"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    end_print = code_fingerprint()
    results["meta"]["git_head_at_end"] = git_head()
    if end_print != results["meta"]["code_fingerprint"]:
        results["meta"]["code_changed_during_run"] = {"code_fingerprint_at_end": end_print}
        log("WARNING: presence/ or lua/ changed while the benchmark ran: the figures mix two versions; run it again")
    report.derive(results)
    results["targets"] = report.targets(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer runs, shorter phases, 2,000 connections")
    group.add_argument("--full", action="store_true", help="the full run (default)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--fanout-sizes", type=int, nargs="+", help="friends per fan-out case (default 10 100 1000)")
    parser.add_argument("--profile", type=float, metavar="S", help="py-spy the gateway for S s (full: 8, quick: 0)")
    parser.add_argument("--no-write", action="store_true", help="print the JSON, write no files")
    parser.add_argument("--render", action="store_true", help="only redraw the chart and tables from latest.json")
    args = parser.parse_args()
    if args.render:
        results = json.loads((RESULTS / "latest.json").read_text())
        report.derive(results)
        results["targets"] = report.targets(results)
        write(results)
        return
    mode = scenarios.QUICK if args.quick else scenarios.FULL
    if args.fanout_sizes:
        mode = dataclasses.replace(mode, fanout_sizes=tuple(args.fanout_sizes))
    command = ("make bench-quick" if args.quick else "make bench") + f"  (python -m bench.run --{mode.name})"
    if args.profile is not None:
        mode = dataclasses.replace(mode, profile_s=args.profile)
    if args.only != list(SCENARIOS) or args.fanout_sizes or args.profile is not None:
        command = "python -m bench.run " + " ".join(sys.argv[1:])
    try:
        import uvloop
    except ImportError:
        results = asyncio.run(main_async(mode, args.only, command))
    else:
        results = uvloop.run(main_async(mode, args.only, command))
    if args.no_write:
        print(json.dumps(results, indent=2))
        return
    write(results)


def write(results: dict[str, Any]) -> None:
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    chart = report.chart(results, RESULTS / "latest.png")
    report.update_markdown(results, ROOT / "BENCHMARKS.md", chart)
    log(
        f"done in {results['meta']['duration_s']:.0f} s: bench/results/latest.json, "
        f"{chart.relative_to(ROOT) if chart else 'no chart (matplotlib missing)'}, BENCHMARKS.md"
    )
    for t in results["targets"]:
        state = {True: "met    ", False: "NOT MET", "partly": "partly ", None: "n/a    "}[t["met"]]
        log(f"target {state}  {t['target']}: {t['value']}")


if __name__ == "__main__":
    main()
