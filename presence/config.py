"""Settings from defaults, a TOML file, the environment and CLI flags (in rising precedence).

Every layer is decoded strictly with msgspec: a value of the wrong type (``unsigned_login = "false"``,
``admins = "admin"``) or an unknown name is a start-up error naming the field and where it came from,
never a silent other meaning. Environment variables are text, so there (only) ``"30"`` counts as 30
and ``"true"``/``"false"`` as booleans.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import msgspec
from yarl import URL

from presence.errors import ParamError
from presence.ids import MAX_USER_ID_BYTES, check_user_id
from presence.limits import MAX_SESSIONS

DEV_APP_ID = 10000
DEFAULT_ADMINS = ("admin",)

_Admin = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_USER_ID_BYTES)]
# Every number has a finite upper bound: inf or 1e20 would overflow a timer or a Redis argument later.
DAY = 86_400.0
_Seconds = Annotated[float, msgspec.Meta(ge=0, le=DAY)]
_Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
# A node id names the node's doorbell channel and is every session's brokerId: the library's brokerId rule.
_NodeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,100}$")]
# Frames carry the app id as a signed 32-bit integer; ids are written in ASCII digits.
MAX_APP_ID = (1 << 31) - 1
_APP_ID = re.compile(r"[0-9]{1,10}")


class AppConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One app: ``[apps.<id>]`` in the TOML file, or an entry of ``PRESENCE_APPS``."""

    private_key: Annotated[str, msgspec.Meta(min_length=1)]
    admins: tuple[_Admin, ...] = DEFAULT_ADMINS
    login_model: Annotated[int, msgspec.Meta(ge=1, le=4)] = 3
    unsigned_login: bool = False
    # Live sessions per user, WEBAPI included; a login beyond it is refused (code 90005).
    max_sessions: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = MAX_SESSIONS
    # Seconds without a frame before a connection of this app is closed; None = the global setting, 0 = never.
    heartbeat_timeout: _Seconds | None = None
    # Every change feed entry of the app is POSTed to each of these (gateway/FEED.md).
    webhook_urls: tuple[Annotated[str, msgspec.Meta(pattern=r"^https?://\S+$")], ...] = ()

    def __post_init__(self) -> None:  # constructors skip the Meta checks that decoding applies
        if not self.private_key:
            raise ParamError("private_key must not be empty")
        if self.heartbeat_timeout is not None and not self.heartbeat_timeout >= 0:
            raise ParamError(f"heartbeat_timeout must be a number >= 0, got {self.heartbeat_timeout}")
        if self.login_model not in (1, 2, 3, 4):
            raise ParamError(f"login_model must be 1..4, got {self.login_model}")
        if self.max_sessions < 1:
            raise ParamError(f"max_sessions must be at least 1, got {self.max_sessions}")
        check_webhook_urls(self.webhook_urls)


def redact_url(url: str) -> str:
    """``url`` without ``user:password@`` (for logs and the start-up summary)."""
    with contextlib.suppress(ValueError):
        parsed = URL(url)
        if parsed.user is not None or parsed.password is not None:
            return str(parsed.with_user(None))
    return url


def check_webhook_urls(urls: Sequence[str]) -> None:
    """Each URL parses (yarl, as aiohttp will), is http(s) with a host and a port 1..65535; none is given twice.

    Raises ParamError naming ``webhook_urls[i]`` and the reason (credentials redacted)."""
    seen: set[str] = set()
    for i, url in enumerate(urls):
        field = f"webhook_urls[{i}]"
        try:
            parsed = URL(url)
            port = parsed.port
        except ValueError as exc:
            raise ParamError(f"{field}: not a usable URL ({exc}): {redact_url(url)!r}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ParamError(f"{field}: must be an http:// or https:// URL with a host, got {redact_url(url)!r}")
        if port is None or not 1 <= port <= 65535:
            raise ParamError(f"{field}: the port must be 1..65535, got {redact_url(url)!r}")
        canonical = str(parsed)
        if canonical in seen:
            raise ParamError(f"{field}: {redact_url(url)!r} is given twice (each URL gets every event once)")
        seen.add(canonical)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting of a node. Each field but ``apps`` and ``dev_mode`` is also a setting of the TOML file, an
    environment variable (``PRESENCE_<NAME>``) and maybe a flag; its type, bounds included, is what they are
    decoded to (constructing Settings directly skips the bounds, as msgspec constructors do)."""

    redis_url: str | None = None
    host: str = "127.0.0.1"
    tcp_port: _Port = 9000
    ws_port: _Port = 19000
    http_port: _Port = 8000
    node_id: _NodeId | None = None
    heartbeat_timeout: _Seconds = 30.0
    node_ttl: _Seconds = 10.0
    offline_grace: _Seconds = 3.0
    # A connection that has not logged in this many seconds after it opened is closed (0 = never).
    login_timeout: _Seconds = 10.0
    # Most client connections at once; 0 = as many as the file descriptor limit allows minus fd_reserve.
    max_connections: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    # Descriptors kept free of client connections: Redis pool, REST and /healthz, listeners, logs.
    fd_reserve: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 128
    prefix: Annotated[str, msgspec.Meta(min_length=1)] = "presence"
    inbox_maxlen: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 100
    inbox_ttl: Annotated[float, msgspec.Meta(ge=0, le=365 * DAY)] = 86400.0
    # Seconds a delivered inbox entry is kept so a reconnecting client can resume after it; then the gateway
    # trims it, and drops an inbox left empty. At least offline_grace and node_ttl plus a second; resume
    # after a silently dead socket needs heartbeat_timeout + offline_grace (30 + 3 by default).
    resume_window: Annotated[float, msgspec.Meta(ge=1, le=DAY)] = 60.0
    # Gateway processes of `presence serve` (SO_REUSEPORT on the TCP and WebSocket ports, REST once).
    workers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    # Seconds a Redis reply may take before the call counts as failed (and is retried; its outcome is
    # resolved by the library's operation ids), and seconds calls are retried before the backplane counts
    # as unavailable (REST 503, LOGIN 90000).
    redis_timeout: Annotated[float, msgspec.Meta(gt=0, le=DAY)] = 5.0
    redis_retry_for: _Seconds = 30.0
    # The change feed: partitions per app (a user's entries all go to one) and entries kept per partition.
    feed_shards: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4
    feed_maxlen: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 100_000
    # Webhooks: attempts per entry before the dead-letter stream, first retry delay (s, doubling), POST timeout (s).
    webhook_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 8
    webhook_backoff: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.5
    webhook_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    apps: Mapping[int, AppConfig] = msgspec.field(default_factory=dict)
    dev_mode: bool = False
    # Dev mode's key for app 10000 (None: a new random one at each start, which invalidates old userSigns).
    dev_key: Annotated[str, msgspec.Meta(min_length=1)] | None = None

    def app(self, app_id: int) -> AppConfig | None:
        return self.apps.get(app_id)

    def heartbeat_timeout_for(self, app_id: int) -> float:
        """The app's own heartbeat timeout if it sets one, else the global (seconds, 0 = never)."""
        app = self.apps.get(app_id)
        return self.heartbeat_timeout if app is None or app.heartbeat_timeout is None else app.heartbeat_timeout


# What one layer (file, environment, flags) may set: the fields of Settings as they are typed there, each
# UNSET unless the layer sets it. Apps have their own syntax in each layer; dev_mode is decided, not set.
_Layer = msgspec.defstruct(
    "_Layer",
    [
        (f.name, f.type | msgspec.UnsetType, msgspec.UNSET)
        for f in msgspec.structs.fields(Settings)
        if f.name not in ("apps", "dev_mode")
    ],
    forbid_unknown_fields=True,
    module=__name__,
)
# The environment variable of each setting: PRESENCE_<NAME>; the Redis URL also from the usual REDIS_URL.
_ENV: dict[str, tuple[str, ...]] = {name: (f"PRESENCE_{name.upper()}",) for name in _Layer.__struct_fields__}
_ENV["redis_url"] += ("REDIS_URL",)


def _decode_layer(value: Mapping[str, Any], where: str, *, strict: bool = True) -> dict[str, Any]:
    """The settings ``value`` sets, decoded; ParamError naming ``where`` and the setting otherwise."""
    layer = _decode(value, _Layer, where, "", strict=strict, unknown="unknown setting")
    return {name: v for name, v in msgspec.structs.asdict(layer).items() if v is not msgspec.UNSET}


def _decode(
    value: Any, kind: type[Any], where: str, path: str, *, strict: bool = True, unknown: str = "unknown field"
) -> Any:
    """msgspec.convert with the error rewritten to name ``where`` (file, variable, flag) and the field path."""
    try:
        return msgspec.convert(value, kind, strict=strict)
    except msgspec.ValidationError as exc:
        message = str(exc).replace("`$.", f"`{path}." if path else "`").replace("`$", f"`{path}")
        message = message.replace("Object contains unknown field", unknown)
        if path and " - at `" not in message:  # msgspec names no path for an error at the top
            message += f" - at `{path}`"
        raise ParamError(f"{where}: {message}") from None
    except ParamError as exc:  # a check of __post_init__ (webhook_urls)
        raise ParamError(f"{where}: {path + '.' if path else ''}{exc.message}") from None


def _app_id(text: str, where: str) -> int:
    """An app id: ASCII digits, 1..2^31-1 (frames carry it as int32)."""
    if not _APP_ID.fullmatch(text) or not 1 <= int(text) <= MAX_APP_ID:
        raise ParamError(f"{where}: the app id must be an integer 1..{MAX_APP_ID} in ASCII digits, got {text!r}")
    return int(text)


def _checked_admins(app: AppConfig, where: str) -> AppConfig:
    """Admins are identifiers: held to the userId rule of presence/ids.py."""
    for i, admin in enumerate(app.admins):
        try:
            check_user_id(f"admins[{i}]", admin)
        except ParamError as exc:
            raise ParamError(f"{where}: {exc.message}") from None
    return app


def parse_apps_env(text: str) -> dict[int, AppConfig]:
    """``PRESENCE_APPS``: comma-separated ``appId:privateKey[:admins=a|b]`` (admins default ``admin``).

    ``admins=`` with nothing after it means no admin; each admin is stripped of surrounding spaces.
    The key may contain ``:`` but not ``,``. An app id given twice is an error.
    """
    apps: dict[int, AppConfig] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        app_text, sep, rest = item.partition(":")
        key, has_admins, admins = rest.rpartition(":admins=") if ":admins=" in rest else (rest, "", "")
        if not sep or not key:
            raise ParamError(
                f"PRESENCE_APPS entries look like 10000:privateKey or 10000:privateKey:admins=alice|bob, got {item!r}"
            )
        app_id = _app_id(app_text.strip(), "PRESENCE_APPS")
        if app_id in apps:
            raise ParamError(f"PRESENCE_APPS: app {app_id} is given twice")
        where = f"PRESENCE_APPS entry {app_id}"
        conf: dict[str, Any] = {"private_key": key}
        if has_admins:
            conf["admins"] = [a.strip() for a in admins.split("|") if a.strip()]
        apps[app_id] = _checked_admins(_decode(conf, AppConfig, where, ""), where)
    return apps


def _apps_from_toml(table: object, where: str) -> dict[int, AppConfig]:
    if not isinstance(table, dict):
        raise ParamError(f"{where}: apps must be a table of [apps.<id>] tables")
    apps = {}
    for name, conf in table.items():
        app_id = _app_id(str(name), f"{where}: [apps.{name}]")
        if app_id in apps:  # [apps.7] and [apps.007]
            raise ParamError(f"{where}: [apps.{name}]: app {app_id} is given twice")
        apps[app_id] = _checked_admins(_decode(conf, AppConfig, where, f"apps.{name}"), f"{where}: apps.{name}")
    return apps


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build Settings: defaults < TOML file < environment < ``overrides`` (None means unset).

    Raises ParamError naming the file, variable or flag, and the field, for anything it cannot take.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    apps: dict[int, AppConfig] = {}
    config_file = config_file or env.get("PRESENCE_CONFIG")
    if config_file:
        where = str(config_file)
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ParamError(f"{where}: {exc}") from None
        apps.update(_apps_from_toml(data.pop("apps", {}), where))
        values.update(_decode_layer(data, where))
    for name, names in _ENV.items():
        # Variables are text: "30" counts as 30 there, "true" as a boolean (strict=False).
        if var := next((var for var in names if env.get(var)), None):
            values.update(_decode_layer({name: env[var]}, f"environment variable {var}", strict=False))
    if env.get("PRESENCE_APPS"):
        apps.update(parse_apps_env(env["PRESENCE_APPS"]))
    for name, value in overrides.items():
        if value is not None:
            values.update(_decode_layer({name: value}, f"option --{name.replace('_', '-')}"))
    settings = Settings(**values, apps=apps)
    floor = max(settings.offline_grace, settings.node_ttl) + 1
    if settings.resume_window < floor:
        raise ParamError(
            f"resume_window must be at least offline_grace and node_ttl plus 1 s ({floor:g} s here), "
            f"got {settings.resume_window:g}"
        )
    return settings


def with_dev_app(settings: Settings) -> Settings:
    """No app configured: dev mode with app 10000 and ``dev_key`` (PRESENCE_DEV_KEY), else a random key."""
    if settings.apps:
        return settings
    app = AppConfig(private_key=settings.dev_key or secrets.token_urlsafe(24))
    return msgspec.structs.replace(settings, apps={DEV_APP_ID: app}, dev_mode=True)


def describe_apps(settings: Settings) -> list[str]:
    """One line per app for the start-up log: who its admins are and its limits."""
    return [
        f"app {app_id}: admins {list(app.admins)}, login_model {app.login_model}, "
        f"max_sessions {app.max_sessions}, unsigned_login {'on' if app.unsigned_login else 'off'}"
        + (f", webhooks {[redact_url(u) for u in app.webhook_urls]}" if app.webhook_urls else "")
        for app_id, app in sorted(settings.apps.items())
    ]
