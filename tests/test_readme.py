"""The README's redis-cli example runs as printed against a real Redis."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from redis.asyncio import Redis

from presence.service import Presence
from tests.clients import APP, stream_entries

README = Path(__file__).resolve().parent.parent / "README.md"


def example_block() -> str:
    text = README.read_text()
    block = text.split("<!-- redis-cli-example -->")[1].split("<!-- /redis-cli-example -->")[0]
    return re.search(r"```sh\n(.*?)```", block, re.S).group(1)  # type: ignore[union-attr]


async def test_readme_redis_cli_example(real_redis: Redis, redis_url: str) -> None:
    presence = Presence(real_redis)
    await presence.add_friend(APP, "alice", "bob")
    await presence.login(APP, "bob", 2, "phone", node_id="n1")
    script = example_block().replace("redis-cli ", f"redis-cli -u {redis_url} ")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, check=True)
    lines = out.stdout.split()
    assert lines[:1] == ["1"] and "bob" in lines
    assert lines[-2:] == ["1", "1"]  # one entry written, one doorbell
    entry = stream_entries(await real_redis.xrange(presence.keys.user(APP, "bob").inbox))[-1][1]
    assert entry[b"c"] == b"4006" and b"in a meeting" in entry[b"d"]
