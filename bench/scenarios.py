"""The scenarios: the machine's ceiling, fan-out (ours beside the seed's design), connections, query and memory."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool

from bench import redisstats
from bench.harness import Change, CpuMeter, Pool, median_of, paced, pct, windowed
from bench.procs import APP, KEY, RedisServer, Server, ceiling_server, log, presence_server, rss_kb, seed_gateway
from bench.seed_logic import SeedLogic, custom_status_key, session_key
from presence.config import Settings
from presence.service import Presence
from presence.wire import HiredisPackingConnection


@dataclass(frozen=True)
class Mode:
    name: str
    runs: int
    fanout_sizes: tuple[int, ...]
    throughput_s: float
    latency_s: float
    latency_least: int
    latency_cap_s: float
    connections: int
    connection_runs: int
    query_iterations: int
    query_baseline_iterations: int
    memory_users: int
    profile_s: float


QUICK = Mode(
    "quick",
    runs=3,
    fanout_sizes=(10, 100, 1000),
    throughput_s=1.0,
    latency_s=1.5,
    latency_least=12,
    latency_cap_s=2.5,
    connections=2000,
    connection_runs=3,
    query_iterations=100,
    query_baseline_iterations=6,
    memory_users=330,
    profile_s=0,
)
FULL = Mode(
    "full",
    runs=5,
    fanout_sizes=(10, 100, 1000),
    throughput_s=5.0,
    latency_s=4.0,
    latency_least=50,
    latency_cap_s=15.0,
    connections=10_000,
    connection_runs=3,
    query_iterations=500,
    query_baseline_iterations=40,
    memory_users=2200,
    profile_s=8.0,
)


@dataclass
class Context:
    mode: Mode
    redis_server: RedisServer
    results_dir: Path
    logs_dir: Path
    admin: Redis = field(init=False)

    def __post_init__(self) -> None:
        self.admin = Redis.from_url(self.redis_server.url)

    async def fresh(self) -> None:
        """Empty keyspace and counters (the function library stays loaded)."""
        await self.admin.flushall()
        await self.admin.config_resetstat()


class CountingConnection(HiredisPackingConnection):
    """Counts writes to Redis: one per command, one per pipeline, i.e. one per round trip."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        await super().send_packed_command(command, check_health)


def driver_client(url: str) -> Redis:
    """The driver's client, as the service makes one (presence.store.open_redis): commands packed by hiredis,
    and a blocking pool (the paced phase is an open loop: on a loaded machine more changes are in flight
    than a default pool holds, 100, and it would raise MaxConnectionsError instead of waiting)."""
    return Redis(
        connection_pool=BlockingConnectionPool.from_url(
            url, max_connections=256, connection_class=HiredisPackingConnection
        )
    )


async def drain_logouts(admin: Redis, node_id: str, timeout: float = 30.0) -> int:
    """After clients closed: wait until the gateway's session set stops shrinking; return what is left.

    Anything left is a session whose logout failed while its gateway is alive: nobody reaps it (ghost presence).
    """
    key = f"presence:node:{node_id}:sessions"
    left, since = -1, time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        now_left = int(await admin.scard(key))
        if now_left == 0:
            return 0
        if now_left != left:
            left, since = now_left, time.monotonic()
        elif time.monotonic() - since > 1.0:
            break
        await asyncio.sleep(0.1)
    return left


def window_for(friends: int) -> int:
    """Changes allowed undelivered at once: enough to keep every stage busy, far below the inbox MAXLEN (100)."""
    return min(64, max(4, 4000 // friends))


def summary_ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(values, 50), 3), "p99_ms": round(pct(values, 99), 3)}


# --- ceiling -----------------------------------------------------------------------------------------


async def ceiling(ctx: Context) -> dict[str, Any]:
    """The same client processes and connection counts against a bare aiohttp server (bench.ceiling_server).

    Deliveries/s: per fan-out size, the same windowed closed loop as ``fanout``, each change one pre-encoded
    frame of the real pack's size written to every connection. Logins/s: the connections scenario's
    count, processes and concurrency, each login an upgrade, one message and one reply.
    """
    mode = ctx.mode
    server = ceiling_server(ctx.logs_dir / "ceiling.log")
    await server.start()
    out: dict[str, Any] = {"by_friends": {}}
    _, writer = await asyncio.open_connection("127.0.0.1", server.control_port)
    try:
        pool = Pool(2)
        await pool.start()
        try:
            for friends in mode.fanout_sizes:
                out["by_friends"][str(friends)] = await _ceiling_size(ctx, server, pool, writer, friends)
                await pool.close()
        finally:
            await pool.stop()
        runs: list[dict[str, Any]] = []
        for r in range(mode.connection_runs):
            pool = Pool(4)
            await pool.start()
            try:
                users = [f"ceil{r}-{i}" for i in range(mode.connections)]
                meter = CpuMeter({"server": [server.pid], "clients": pool.pids})
                meter.start()
                res = await pool.connect(server.url, users, None, f"ceiling logins run {r + 1}", concurrency=32)
                cpu = meter.stop()
                elapsed = (res["t_last"] - res["t_first"]) / 1e9
                run = {
                    "count": res["ok"],
                    "failed": res["fail"],
                    "logins_per_s": round((res["ok"] - res["retried"] + res["fail"]) / elapsed, 1),
                    "login_cpu_pct": cpu,
                }
                runs.append(run)
                log(f"ceiling logins run {r + 1}/{mode.connection_runs}: {run['logins_per_s']:,.0f}/s; cpu {cpu}")
                await pool.close()
            finally:
                await pool.stop()
        out["logins_per_s"] = median_of(runs, "logins_per_s")
        out["login_runs"] = runs
    finally:
        writer.close()
        await server.stop()
    by = out["by_friends"]
    pick = "100" if "100" in by else (next(iter(by)) if by else None)
    out["deliveries_per_s"] = by[pick]["deliveries_per_s"] if pick else None
    out["deliveries_per_s_at_friends"] = int(pick) if pick else None
    return out


async def _ceiling_size(
    ctx: Context, server: Server, pool: Pool, writer: asyncio.StreamWriter, friends: int
) -> dict[str, Any]:
    label = f"ceiling friends={friends}"
    res = await pool.connect(server.url, [f"g{friends}-{i}" for i in range(friends)], None, label)
    if res["fail"]:
        raise RuntimeError(f"{label}: {res['fail']} logins failed: {res['errors']}")

    async def change(seq: int, at: int) -> None:
        writer.write(f"{seq} {at} {friends}\n".encode())
        await writer.drain()

    tracker = pool.expect()
    window = window_for(friends)
    await windowed(change, tracker, window, 0.3)
    await pool.stats()
    meter = CpuMeter({"server": [server.pid], "clients": pool.pids})
    runs: list[dict[str, Any]] = []
    for r in range(ctx.mode.runs):
        meter.start()
        tput = await windowed(change, tracker, window, ctx.mode.throughput_s)
        cpu = meter.stop()
        got = await pool.stats()
        run = {
            "changes_per_s": round(tput["changes_per_s"], 1),
            "deliveries_per_s": round(tput["changes_per_s"] * friends, 1),
            "superseded_changes": tput.get("superseded", 0),  # overtaken by a newer one: never pushed
            "deliveries_counted": got["received"],
            "deliveries_expected": tput["changes"] * friends,
            "cpu_pct": cpu,
        }
        runs.append(run)
        log(f"{label} run {r + 1}/{ctx.mode.runs}: {run['deliveries_per_s']:,.0f} deliveries/s; cpu {cpu}")
    return {
        "friends": friends,
        "window": window,
        "changes_per_s": median_of(runs, "changes_per_s"),
        "deliveries_per_s": median_of(runs, "deliveries_per_s"),
        "runs": runs,
    }


# --- fan-out -----------------------------------------------------------------------------------------


async def fanout(ctx: Context, system: str) -> dict[str, Any]:
    """friends = 10, 100, 1000, all online on one gateway; one user changes its custom status."""
    await ctx.fresh()
    log_path = ctx.logs_dir / f"fanout-{system}.log"
    if system == "ours":
        server = presence_server(ctx.redis_server.url, "bench-ours", log_path)
    else:
        server = seed_gateway(ctx.redis_server.url, 1, log_path)
    await server.start()
    pool = Pool(2)
    await pool.start()
    client = driver_client(ctx.redis_server.url)
    presence = Presence(client, Settings())
    seed = SeedLogic(client)
    if system == "ours":
        await presence.start()
    out: dict[str, Any] = {}
    inner: set[str] | None = None
    try:
        for friends in ctx.mode.fanout_sizes:
            out[str(friends)], inner = await _fanout_size(ctx, system, server, pool, presence, seed, friends, inner)
            if ctx.mode.profile_s and system == "ours" and friends == 100:
                out["profile"] = await _profile(ctx, server, pool, presence, friends)
            await pool.close()
            if system == "ours":
                left = await drain_logouts(ctx.admin, "bench-ours")
                out[str(friends)]["sessions_left_after_logout"] = left
                if left:
                    log(f"fanout ours friends={friends}: {left} sessions still online after their clients closed")
        out["gateway_log"] = server.log_errors()
    finally:
        await pool.stop()
        await server.stop()
        await client.aclose()
    return out


def changers(user: str, friends: int) -> list[str]:
    """The users whose changes a fan-out run sends, in turn: one per window slot, all with the same friends.

    Changes of one user that overlap overtake each other in Redis, and our fan-out never pushes the older
    one after the newer (issue 10), so one user changing at full rate measures skipped pushes, not fan-out.
    With a user per slot every change is pushed to every friend, as for the seed's design.
    """
    return [user] + [f"{user}-{k}" for k in range(1, window_for(friends))]


async def import_friends(
    system: str, presence: Presence, seed: SeedLogic, users: list[str], members: list[str]
) -> None:
    for user in users:
        if system == "ours":
            await presence.import_friends(APP, user, members)
        else:
            await seed.import_friends(APP, user, members)


def _change_fn(system: str, presence: Presence, seed: SeedLogic, user: str | list[str]) -> Change:
    users = [user] if isinstance(user, str) else user
    if system == "ours":

        async def ours(seq: int, at: int) -> None:
            await presence.set_custom_status(APP, users[seq % len(users)], seq % 1000, f"b{seq}:{at}")

        return ours

    async def baseline(seq: int, at: int) -> None:
        await seed.set_user_customer_status(APP, users[seq % len(users)], seq % 1000, f"b{seq}:{at}")

    return baseline


async def _fanout_size(
    ctx: Context,
    system: str,
    server: Server,
    pool: Pool,
    presence: Presence,
    seed: SeedLogic,
    friends: int,
    inner: set[str] | None,
) -> tuple[dict[str, Any], set[str]]:
    mode = ctx.mode
    label = f"fanout {system} friends={friends}"
    user = f"c{friends}"
    members = [f"f{friends}-{i}" for i in range(friends)]
    users = changers(user, friends)
    await import_friends(system, presence, seed, users, members)
    res = await pool.connect(server.url, members, KEY if system == "ours" else None, label)
    if res["fail"]:
        raise RuntimeError(f"{label}: {res['fail']} logins failed: {res['errors']}")
    change = _change_fn(system, presence, seed, users)
    tracker = pool.expect()
    tracker.users = len(users)
    window = window_for(friends)

    # Warm-up; on the first size, a MONITOR window beside a few changes spread over more than one node
    # heartbeat (1 s) learns which commands run inside functions.
    await windowed(change, tracker, window, 0.3)
    if inner is None:

        async def spaced() -> None:
            for _ in range(4):
                await windowed(change, tracker, 1, 0.0)
                await asyncio.sleep(0.35)

        inner = await redisstats.inner_command_names("127.0.0.1", ctx.redis_server.port, spaced)
    await pool.stats()

    meter = CpuMeter({"gateway": [server.pid], "redis": [ctx.redis_server.pid], "clients": pool.pids})
    runs: list[dict[str, Any]] = []
    for r in range(mode.runs):
        try:
            before = await redisstats.snapshot(ctx.admin)
            meter.start()
            tput = await windowed(change, tracker, window, mode.throughput_s)
            cpu = meter.stop()
            delta = await redisstats.snapshot(ctx.admin) - before
            split = redisstats.split(delta, inner)
            got = await pool.stats()
            rate = tput["changes_per_s"] / 2
            lat = await paced(change, tracker, rate, mode.latency_s, mode.latency_least, mode.latency_cap_s)
            got_lat = await pool.stats()
        except RuntimeError as exc:
            log(f"{label} run {r + 1}: FAILED: {exc}")
            tracker.forget()
            await pool.stats()
            runs.append({"error": str(exc)})
            continue
        n = tput["changes"]
        run = {
            "changes_per_s": round(tput["changes_per_s"], 1),
            "deliveries_per_s": round(tput["changes_per_s"] * friends, 1),
            "superseded_changes": tput.get("superseded", 0),  # overtaken by a newer one: never pushed
            "deliveries_counted": got["received"],
            "deliveries_expected": n * friends,
            "saturated_p50_ms": round(pct(tput["latency_ms"], 50), 3),
            "latency_rate_per_s": round(rate, 1),
            "latency_changes": lat["changes"],
            "driver_max_lag_ms": round(lat["max_driver_lag_ms"], 2),
            **summary_ms(lat["latency_ms"]),
            "delivery_p50_ms": round(pct([x / 1000 for x in got_lat["lat_us"]], 50), 3),
            "delivery_p99_ms": round(pct([x / 1000 for x in got_lat["lat_us"]], 99), 3),
            "redis_commands_per_change": round(split.top_level / n, 2),
            "redis_inner_commands_per_change": round(split.inner / n, 2),
            "redis_usec_per_change": round(split.usec / n, 1),
            "redis_cpu_ms_per_change": round(1000 * delta.cpu_s / n, 3),
            "redis_commands": {k: round(v / n, 2) for k, v in split.by_command.items()},
            "redis_usec_by_command": {k: round(v / n, 1) for k, v in split.usec_by_command.items()},
            "cpu_pct": cpu,
        }
        runs.append(run)
        log(
            f"{label} run {r + 1}/{mode.runs}: {run['changes_per_s']:,.0f} changes/s, "
            f"{run['deliveries_per_s']:,.0f} deliveries/s; at {rate:,.0f}/s p50 {run['p50_ms']} ms "
            f"p99 {run['p99_ms']} ms; redis {run['redis_commands_per_change']} + "
            f"{run['redis_inner_commands_per_change']} inner commands/change; cpu {cpu}"
        )
    largest = await _largest_call(ctx, change, tracker, window)
    log(f"{label}: largest single Redis call {largest['largest_call_ms']} ms ({largest['command']})")
    good = [r for r in runs if "error" not in r]
    keys = [
        "changes_per_s",
        "deliveries_per_s",
        "p50_ms",
        "p99_ms",
        "delivery_p50_ms",
        "delivery_p99_ms",
        "latency_rate_per_s",
        "saturated_p50_ms",
        "redis_commands_per_change",
        "redis_inner_commands_per_change",
        "redis_usec_per_change",
        "redis_cpu_ms_per_change",
    ]
    result: dict[str, Any] = {k: median_of(good, k) for k in keys}
    result.update({"friends": friends, "window": window, "runs": runs, "inner_command_names": sorted(inner)})
    result["largest_call_ms"] = largest["largest_call_ms"]
    result["largest_call"] = largest
    if good:
        result["cpu_pct"] = {
            k: round(sorted(r["cpu_pct"][k] for r in good)[len(good) // 2], 1) for k in good[0]["cpu_pct"]
        }
        result["redis_commands"] = good[len(good) // 2]["redis_commands"]
        result["redis_usec_by_command"] = good[len(good) // 2]["redis_usec_by_command"]
    return result, inner


async def _largest_call(ctx: Context, change: Change, tracker: Any, window: int) -> dict[str, Any]:
    """The longest time one command held Redis (SLOWLOG at threshold 0) over a short extra windowed run.

    Redis runs one command at a time, so this is how long every other client may wait behind one
    fan-out call. Measured apart from the timed runs (logging every command costs a little).
    """
    admin = ctx.admin
    before = await admin.config_get("slowlog-*")
    await admin.config_set("slowlog-max-len", 100_000)
    await admin.config_set("slowlog-log-slower-than", 0)
    await admin.slowlog_reset()
    try:
        tput = await windowed(change, tracker, window, max(0.5, ctx.mode.throughput_s / 2))
        entries = await admin.slowlog_get(100_000)
    finally:
        for k, v in before.items():
            assert k is not None and v is not None  # CONFIG GET names and values (redis-py types them Optional)
            await admin.config_set(k, v)
    calls = [e for e in entries if not _text(e["command"]).upper().startswith(("SLOWLOG", "CONFIG"))]
    top = max(calls, key=lambda e: e["duration"], default=None)
    fcalls = [e["duration"] for e in calls if _text(e["command"]).upper().startswith("FCALL")]
    return {
        "largest_call_ms": round(top["duration"] / 1000, 3) if top else None,
        "command": _text(top["command"])[:60] if top else None,
        "largest_fcall_ms": round(max(fcalls) / 1000, 3) if fcalls else None,
        "mean_fcall_ms": round(sum(fcalls) / len(fcalls) / 1000, 3) if fcalls else None,
        "p99_fcall_ms": round(pct(fcalls, 99) / 1000, 3) if fcalls else None,
        "changes": tput["changes"],
    }


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


async def _profile(ctx: Context, server: Server, pool: Pool, presence: Presence, friends: int) -> dict[str, Any]:
    """py-spy on the gateway while the fan-out runs flat out (an extra run, not one of the measured ones)."""
    from bench import profile

    assert isinstance(presence.redis, Redis)  # the bench's one redis-server
    change = _change_fn("ours", presence, SeedLogic(presence.redis), changers(f"c{friends}", friends))
    tracker = pool.tracker
    assert tracker is not None
    tracker.users = window_for(friends)
    raw = ctx.results_dir / "profile-gateway.txt"
    log(f"profiling the gateway with py-spy for {ctx.mode.profile_s:.0f} s (fanout ours friends={friends})")
    spy = await profile.start(server.pid, ctx.mode.profile_s, raw)
    if spy is None:
        return {"error": "py-spy is not installed or cannot attach"}
    try:
        await windowed(change, tracker, window_for(friends), ctx.mode.profile_s + 1.0)
    except RuntimeError as exc:
        log(f"profile run: {exc}")
        tracker.forget()
    await pool.stats()
    return await profile.finish(spy, raw, ctx.results_dir / "profile-gateway.md")


# --- connections -------------------------------------------------------------------------------------


async def connections(ctx: Context) -> dict[str, Any]:
    """N concurrent logged-in WebSocket connections on one gateway process: RSS per connection and logins/s."""
    count = ctx.mode.connections
    runs: list[dict[str, Any]] = []
    for r in range(ctx.mode.connection_runs):
        await ctx.fresh()
        server = presence_server(ctx.redis_server.url, f"bench-conn-{r}", ctx.logs_dir / f"connections-{r}.log")
        pool = Pool(4)
        await pool.start()
        await server.start()
        try:
            await asyncio.sleep(0.5)
            rss0 = rss_kb(server.pid)
            meter = CpuMeter({"gateway": [server.pid], "redis": [ctx.redis_server.pid], "clients": pool.pids})
            meter.start()
            users = [f"k{r}-{i}" for i in range(count)]
            res = await pool.connect(server.url, users, KEY, f"connections run {r + 1}", concurrency=32, ping_s=15)
            cpu = meter.stop()
            await asyncio.sleep(1.0)
            rss1 = rss_kb(server.pid)
            held = int(await ctx.admin.scard(f"presence:node:bench-conn-{r}:sessions"))
            elapsed = (res["t_last"] - res["t_first"]) / 1e9
            run = {
                "count": res["ok"],
                "failed_first_try": res["retried"],
                "failed": res["fail"],
                "sessions_in_redis": held,
                "rss_idle_kb": rss0,
                "rss_loaded_kb": rss1,
                "rss_per_connection_kb": round((rss1 - rss0) / max(1, res["ok"]), 2),
                "logins_per_s": round((res["ok"] - res["retried"] + res["fail"]) / elapsed, 1),
                "login_cpu_pct": cpu,
                "errors": res["errors"],
            }
            await pool.close()
            run["sessions_left_after_logout"] = await drain_logouts(ctx.admin, f"bench-conn-{r}")
            run["gateway_log"] = server.log_errors()
            runs.append(run)
            log(
                f"connections run {r + 1}/{ctx.mode.connection_runs}: {run['count']} logged in "
                f"({run['failed']} failed), {run['logins_per_s']:,.0f} logins/s, "
                f"{run['rss_per_connection_kb']} KB RSS per connection; cpu {cpu}; after the clients closed, "
                f"{run['sessions_left_after_logout']} sessions were still online"
            )
        finally:
            await pool.stop()
            await server.stop()
    keys = ("count", "rss_per_connection_kb", "logins_per_s", "failed", "sessions_left_after_logout")
    result: dict[str, Any] = {k: median_of(runs, k) for k in keys}
    result["count"] = int(result["count"] or 0)
    result.update({"target_count": 10_000, "reduced": count < 10_000, "runs": runs})
    if count < 10_000:
        result["note"] = f"quick mode: {count} connections instead of 10,000"
    return result


async def _fcall_ro_usec(admin: Redis) -> int:
    """Microseconds Redis spent in FCALL_RO so far (the query's function, inner commands included)."""
    stats = await admin.info("commandstats")
    return int((stats.get("cmdstat_fcall_ro") or {}).get("usec", 0))


# --- query -------------------------------------------------------------------------------------------


async def query(ctx: Context) -> dict[str, Any]:
    """Status of 500 users in one call: ours (presence_query) beside the seed's loop (2 round trips per user)."""
    await ctx.fresh()
    n = 500
    users = [f"q{i}" for i in range(n)]
    server = presence_server(ctx.redis_server.url, "bench-query", ctx.logs_dir / "query.log")
    await server.start()
    pool = Pool(1)
    await pool.start()
    counting = Redis.from_url(ctx.redis_server.url, connection_class=CountingConnection)
    presence = Presence(counting, Settings())
    seed = SeedLogic(counting)
    mode = ctx.mode
    try:
        # Half the users online through the real gateway, a third with a custom status, the rest never seen.
        res = await pool.connect(server.url, users[::2], KEY, "query setup")
        if res["fail"]:
            raise RuntimeError(f"query setup: {res['fail']} logins failed: {res['errors']}")
        for u in users[::3]:
            await presence.set_custom_status(APP, u, 1, "in a meeting")
        # The same state in the seed's keys.
        async with ctx.admin.pipeline(transaction=False) as pipe:
            for i, u in enumerate(users):
                if i % 2 == 0:
                    pipe.hset(
                        session_key(APP, u),
                        "1:bench",
                        (
                            f'{{"appId":{APP},"userId":"{u}","clientType":1,"imei":"bench","connectState":1,'
                            f'"brokerId":1,"brokerHost":"127.0.0.1","version":1}}'
                        ),
                    )
                if i % 3 == 0:
                    pipe.set(
                        custom_status_key(APP, u), f'{{"customStatus":1,"customText":"in a meeting","userId":"{u}"}}'
                    )
            await pipe.execute()
        for _ in range(10):
            await presence.query_users(APP, users)
        runs: list[dict[str, Any]] = []
        for r in range(mode.runs):
            ours_ms, sends0 = [], CountingConnection.sends
            usec0 = await _fcall_ro_usec(ctx.admin)
            for _ in range(mode.query_iterations):
                t = time.perf_counter_ns()
                result = await presence.query_users(APP, users)
                ours_ms.append((time.perf_counter_ns() - t) / 1e6)
            round_trips = (CountingConnection.sends - sends0) / mode.query_iterations
            redis_ms = (await _fcall_ro_usec(ctx.admin) - usec0) / 1000 / mode.query_iterations
            assert len(result) == n
            ws_ms = await pool.pull(users, mode.query_iterations)
            seed_ms, sends0 = [], CountingConnection.sends
            for _ in range(mode.query_baseline_iterations):
                t = time.perf_counter_ns()
                await seed.query_user_online_status(APP, users)
                seed_ms.append((time.perf_counter_ns() - t) / 1e6)
            seed_trips = (CountingConnection.sends - sends0) / mode.query_baseline_iterations
            run = {
                **summary_ms(ours_ms),
                "redis_ms_per_query": round(redis_ms, 3),
                "round_trips": round_trips,
                "ws_p50_ms": round(pct(ws_ms, 50), 3),
                "ws_p99_ms": round(pct(ws_ms, 99), 3),
                "baseline_p50_ms": round(pct(seed_ms, 50), 3),
                "baseline_p99_ms": round(pct(seed_ms, 99), 3),
                "baseline_round_trips": seed_trips,
            }
            runs.append(run)
            log(
                f"query run {r + 1}/{mode.runs}: ours p50 {run['p50_ms']} ms p99 {run['p99_ms']} ms "
                f"(Redis {run['redis_ms_per_query']} ms) in "
                f"{round_trips:g} round trip(s); over WebSocket p50 {run['ws_p50_ms']} ms p99 {run['ws_p99_ms']} ms; "
                f"seed p50 {run['baseline_p50_ms']} ms in {seed_trips:g} round trips"
            )
        await pool.close()
        gateway_log = server.log_errors()
    finally:
        await pool.stop()
        await server.stop()
        await counting.aclose()
    return {
        "gateway_log": gateway_log,
        "users": n,
        "p50_ms": median_of(runs, "p50_ms"),
        "p99_ms": median_of(runs, "p99_ms"),
        "round_trips": median_of(runs, "round_trips"),
        "redis_ms_per_query": median_of(runs, "redis_ms_per_query"),
        "ws_p50_ms": median_of(runs, "ws_p50_ms"),
        "ws_p99_ms": median_of(runs, "ws_p99_ms"),
        "iterations_per_run": mode.query_iterations,
        "baseline": {
            "p50_ms": median_of(runs, "baseline_p50_ms"),
            "p99_ms": median_of(runs, "baseline_p99_ms"),
            "round_trips": median_of(runs, "baseline_round_trips"),
            "iterations_per_run": mode.query_baseline_iterations,
        },
        "runs": runs,
    }


# --- workers -----------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


async def workers(ctx: Context) -> dict[str, Any]:
    """`presence serve --workers 1` beside `--workers 2`: fan-out to 100 friends and logins, same clients."""
    mode = ctx.mode
    out: dict[str, Any] = {}
    friends = 100
    for n in (1, 2):
        await ctx.fresh()
        label = f"workers={n}"
        server = presence_server(
            ctx.redis_server.url, f"bench-workers{n}", ctx.logs_dir / f"workers-{n}.log", ["--workers", str(n)]
        )
        await server.start()
        client = driver_client(ctx.redis_server.url)
        presence = Presence(client, Settings())
        row: dict[str, Any] = {"workers": n}
        try:
            pids = [server.pid, *_children(server.pid)]
            pool = Pool(4)
            await pool.start()
            try:
                meter = CpuMeter({"gateway": pids, "redis": [ctx.redis_server.pid], "clients": pool.pids})
                meter.start()
                users = [f"w{n}-{i}" for i in range(mode.connections)]
                res = await pool.connect(server.url, users, KEY, f"{label} logins", concurrency=32)
                row["login_cpu_pct"] = meter.stop()
                elapsed = (res["t_last"] - res["t_first"]) / 1e9
                row["logins_per_s"] = round((res["ok"] - res["retried"] + res["fail"]) / elapsed, 1)
                await pool.close()
            finally:
                await pool.stop()
            pool = Pool(2)
            await pool.start()
            try:
                user, members = f"wc{n}", [f"wf{n}-{i}" for i in range(friends)]
                users = changers(user, friends)
                await import_friends("ours", presence, SeedLogic(client), users, members)
                res = await pool.connect(server.url, members, KEY, f"{label} fan-out")
                change = _change_fn("ours", presence, SeedLogic(client), users)
                tracker = pool.expect()
                tracker.users = len(users)
                await windowed(change, tracker, window_for(friends), 0.3)
                await pool.stats()
                runs = []
                for _ in range(mode.runs):
                    meter = CpuMeter({"gateway": pids, "redis": [ctx.redis_server.pid], "clients": pool.pids})
                    meter.start()
                    tput = await windowed(change, tracker, window_for(friends), mode.throughput_s)
                    runs.append(
                        {"deliveries_per_s": round(tput["changes_per_s"] * friends, 1), "cpu_pct": meter.stop()}
                    )
                    await pool.stats()
                row["deliveries_per_s_100_friends"] = median_of(runs, "deliveries_per_s")
                row["fanout_runs"] = runs
                await pool.close()
            finally:
                await pool.stop()
            log(
                f"{label}: {row['logins_per_s']:,.0f} logins/s, {row['deliveries_per_s_100_friends']:,.0f} "
                f"deliveries/s at {friends} friends"
            )
        except Exception as exc:
            row["error"] = repr(exc)
            log(f"{label} FAILED: {exc!r}")
        finally:
            await server.stop()
            await client.aclose()
        out[str(n)] = row
    return out


MEMORY_RESUME_WINDOW_S = 5.0

# --- memory ------------------------------------------------------------------------------------------


async def memory(ctx: Context) -> dict[str, Any]:
    """Redis bytes per online user (sessions + status + inbox; friends excluded), by MEMORY USAGE."""
    await ctx.fresh()
    # A short resume window (the default is 60 s) so the steady state comes within the run.
    extra = ["--resume-window", str(MEMORY_RESUME_WINDOW_S), "--node-ttl", "3"]
    server = presence_server(ctx.redis_server.url, "bench-memory", ctx.logs_dir / "memory.log", extra)
    await server.start()
    pool = Pool(2)
    await pool.start()
    client = Redis.from_url(ctx.redis_server.url)
    presence = Presence(client, Settings())
    node_max_bytes = (await ctx.admin.config_get("stream-node-max-bytes"))["stream-node-max-bytes"]
    assert node_max_bytes is not None
    node_max = int(node_max_bytes)
    out: dict[str, Any] = {"stream_node_max_bytes": node_max, "resume_window_s": MEMORY_RESUME_WINDOW_S}
    try:
        out.update(await _memory_group(ctx, server, pool, presence, "m", ctx.mode.memory_users))
        # The same with smaller stream nodes (a Redis setting, not the service's): what an operator can get.
        await ctx.admin.config_set("stream-node-max-bytes", 512)
        small = await _memory_group(ctx, server, pool, presence, "s", ctx.mode.memory_users)
        await ctx.admin.config_set("stream-node-max-bytes", node_max)
        out["with_stream_node_max_bytes_512"] = {k: v for k, v in small.items() if k != "users"}
        out["gateway_log"] = server.log_errors()
    finally:
        await pool.stop()
        await server.stop()
        await client.aclose()
    return out


async def _usage(ctx: Context, presence: Presence, users: list[str]) -> dict[str, float]:
    async with ctx.admin.pipeline(transaction=False) as pipe:
        for u in users:
            k = presence.user(APP, u)
            pipe.memory_usage(k.sessions, samples=0)
            pipe.memory_usage(k.status, samples=0)
            pipe.memory_usage(k.inbox, samples=0)
            pipe.xlen(k.inbox)
        replies = await pipe.execute()
    n = len(users)
    sessions = sum(replies[0::4] or [0]) / n
    status = sum(x or 0 for x in replies[1::4]) / n
    inbox = sum(x or 0 for x in replies[2::4]) / n
    entries = sum(replies[3::4]) / n
    return {
        "sessions_bytes": round(sessions, 1),
        "status_bytes": round(status, 1),
        "inbox_bytes": round(inbox, 1),
        "inbox_entries": round(entries, 2),
        "bytes_per_user": round(sessions + status + inbox, 1),
    }


async def _memory_group(
    ctx: Context, server: Server, pool: Pool, presence: Presence, prefix: str, count: int
) -> dict[str, Any]:
    group = 11  # each user has 10 friends
    count -= count % group
    users = [f"{prefix}{i}" for i in range(count)]
    res = await pool.connect(server.url, users, KEY, f"memory setup ({prefix})")
    if res["fail"]:
        raise RuntimeError(f"memory setup: {res['fail']} logins failed: {res['errors']}")
    after_login = await _usage(ctx, presence, users)
    for g in range(0, count, group):
        members = users[g : g + group]
        for i, u in enumerate(members[:-1]):
            await presence.import_friends(APP, u, members[i + 1 :])
    sem = asyncio.Semaphore(32)

    async def change(u: str) -> None:
        async with sem:
            await presence.set_custom_status(APP, u, 1, "away for lunch, back at two")

    await asyncio.gather(*(change(u) for u in users))
    await asyncio.sleep(1.0)  # let the gateway deliver (entries stay in the inbox for the resume window)
    online = await _usage(ctx, presence, users)
    # Steady state: the resume window has passed and the gateway trimmed what its sessions received.
    deadline = time.monotonic() + MEMORY_RESUME_WINDOW_S + 10
    steady = online
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        steady = await _usage(ctx, presence, users)
        if steady["inbox_entries"] == 0:
            break
    await pool.close()
    online["sessions_left_after_logout"] = await drain_logouts(ctx.admin, "bench-memory")
    log(
        f"memory ({prefix}): {online['bytes_per_user']:,.0f} B per online user right after delivery with "
        f"{online['inbox_entries']:g} inbox entries (sessions {online['sessions_bytes']:.0f}, status "
        f"{online['status_bytes']:.0f}, inbox {online['inbox_bytes']:.0f}); {steady['bytes_per_user']:,.0f} B "
        f"steady ({steady['inbox_entries']:g} entries left); {after_login['bytes_per_user']:,.0f} B right after login"
    )
    return {
        "users": count,
        "redis_bytes_per_online_user": online["bytes_per_user"],
        "redis_bytes_per_online_user_steady": steady["bytes_per_user"],
        "breakdown": online,
        "steady": steady,
        "after_login": after_login,
    }
