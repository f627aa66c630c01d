"""The presence command: sign, functions show|load."""

from __future__ import annotations

import subprocess
import sys

import pytest
from redis import Redis

from presence.auth import verify_user_sign
from presence.library import library_source
from tests.redis_servers import Cluster
from tests.test_auth import JAVA_KEY, JAVA_VECTORS


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "presence", *args], capture_output=True, text=True, timeout=30)


def test_sign_prints_a_verifiable_user_sign() -> None:
    out = run("sign", "--app-id", "10000", "--key", "secret", "--user", "alice", "--expire", "60")
    assert out.returncode == 0
    verify_user_sign(out.stdout.strip(), 10000, "secret", "alice")


@pytest.mark.parametrize("user", sorted(JAVA_VECTORS))
def test_sign_with_issued_at_prints_the_java_sigapi_vector(user: str) -> None:
    args = ("--app-id", "10000", "--key", JAVA_KEY, "--user", user, "--expire", "3600", "--issued-at", "1700000000")
    out = run("sign", *args)
    assert out.returncode == 0 and out.stdout == JAVA_VECTORS[user] + "\n"


def test_functions_show_prints_the_library() -> None:
    out = run("functions", "show")
    assert out.returncode == 0 and out.stdout == library_source()


def test_functions_load_loads_once(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    client.function_flush()
    first = run("functions", "load", "--redis", redis_url)
    second = run("functions", "load", "--redis", redis_url)
    assert first.returncode == 0 and "loaded library presence" in first.stdout
    assert second.returncode == 0 and "already up to date" in second.stdout
    assert client.fcall("presence_version", 0) == b"4.1.3"
    client.close()


def test_functions_load_without_url_explains() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "presence", "functions", "load"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    assert out.returncode == 2 and "needs --redis URL" in out.stderr


def test_functions_load_and_show_on_every_cluster_primary(cluster: Cluster) -> None:
    cluster.flush()
    first = run("functions", "load", "--redis", cluster.url)  # one node's URL: the cluster is found
    assert first.returncode == 0 and "loaded library presence" in first.stdout, first.stderr
    for node in cluster.primaries():
        with node.client() as c:
            assert c.fcall("presence_version", 0) == b"4.1.3"
    with cluster.primaries()[1].client() as c:
        c.function_flush()  # a primary that restarted empty
    shown = run("functions", "show", "--redis", cluster.url)
    assert shown.returncode == 1, "a primary without the library is a failed check"
    assert shown.stdout.count("up to date") == 2 and shown.stdout.count("missing or outdated") == 1
    assert "loaded library presence" in run("functions", "load", "--redis", cluster.url).stdout
    shown = run("functions", "show", "--redis", cluster.url)
    assert shown.returncode == 0 and shown.stdout.count("up to date") == 3


def test_functions_help_says_what_show_does() -> None:
    out = run("functions", "--help").stdout
    assert "without --redis, print the library's code" in out and "exit status 1" in out


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:{closed}/0", "cannot reach redis at redis://127.0.0.1:"),
        ("redis://nosuchuser:s3cr3t@127.0.0.1:{redis}/0", "refused the credentials"),
        ("http://127.0.0.1:{redis}/0", "bad redis URL"),
        ("redis+sentinel://127.0.0.1:{closed}/nosuchmaster", "know no such master"),
    ],
)
def test_a_bad_redis_url_at_start_is_one_clear_line_and_exit_2(url: str, says: str, redis_url: str) -> None:
    from tests.redis_servers import free_port

    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    target = url.format(closed=free_port(), redis=port)
    for args in (("functions", "load", "--redis", target), ("serve", "--redis", target, "--http-port", "0")):
        out = run(*args)
        assert out.returncode == 2, out.stderr
        last = out.stderr.strip().splitlines()[-1]  # serve logs its settings first
        assert last.startswith("presence: ") and says in last, out.stderr
        assert "Traceback" not in out.stderr and "s3cr3t" not in out.stderr, "no traceback, no password"


def test_a_port_in_use_at_start_is_one_clear_line_and_exit_2(redis_url: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run("serve", "--redis", redis_url, "--tcp-port", str(port), "--ws-port", "0", "--http-port", "0")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines[-1].startswith("presence: cannot listen"), out.stderr
    assert "Traceback" not in out.stderr


def test_serve_help_explains_the_redis_urls() -> None:
    out = run("serve", "--help")
    assert out.returncode == 0
    for text in ("redis+sentinel://", "Redis Cluster node", "embedded in-process store", "sentinel_password"):
        assert text in out.stdout
