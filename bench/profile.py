"""py-spy on a running gateway: raw collapsed stacks, and a summary of where its CPU time goes."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r":\d+\)$")


def _exe() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def start(pid: int, seconds: float, raw: Path) -> asyncio.subprocess.Process | None:
    exe = _exe()
    if exe is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(raw),
        "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(0.5)
    if proc.returncode is not None:
        return None
    return proc


def _frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)`` relative to site-packages or the repo."""
    frame = _LINE.sub(")", frame.strip())
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in frame:
            head, _, tail = frame.partition("(")
            frame = head + "(" + tail.split(marker, 1)[1]
            break
    return frame


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
        leaf = frames[-1]
        package = leaf.partition("(")[2].split("/")[0].rstrip(")") or "?"
        by_package[package] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "self_pct": share(own),
        "inclusive_pct": share(inclusive),
        "by_package_pct": share(by_package),
    }


async def finish(proc: asyncio.subprocess.Process, raw: Path, report: Path) -> dict[str, Any]:
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode(errors="replace")
    await proc.wait()
    if proc.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed ({proc.returncode}): {err.strip()[-500:]}"}
    summary = summarize(raw)
    lines = [
        "# py-spy profile of the gateway (`presence serve`) during fan-out to 100 friends",
        "",
        f"{summary['samples']} samples of non-idle stacks at 250 Hz; raw collapsed stacks in `{raw.name}`.",
        "",
    ]
    for title, key in (
        ("Own time (the frame on top of the stack)", "self_pct"),
        ("Own time by package", "by_package_pct"),
        ("Inclusive time (the frame anywhere in the stack)", "inclusive_pct"),
    ):
        lines += [f"## {title}", "", "| % | frame |", "|---:|---|"]
        lines += [f"| {p} | `{name}` |" for name, p in summary[key]]
        lines.append("")
    report.write_text("\n".join(lines))
    summary.update({"raw": str(raw.name), "report": str(report.name)})
    return summary
