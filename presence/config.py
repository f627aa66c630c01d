"""Settings from defaults, a TOML file, the environment and CLI flags (in rising precedence)."""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from presence.errors import ParamError

DEV_APP_ID = 10000


@dataclass(frozen=True, slots=True)
class AppConfig:
    private_key: str
    admins: tuple[str, ...] = ("admin",)
    login_model: int = 3
    unsigned_login: bool = False
    # Seconds without a frame before a connection of this app is closed; None = the global setting, 0 = never.
    heartbeat_timeout: float | None = None

    def __post_init__(self) -> None:
        if not self.private_key:
            raise ParamError("private_key must not be empty")
        if self.heartbeat_timeout is not None and not self.heartbeat_timeout >= 0:
            raise ParamError(f"heartbeat_timeout must be a number >= 0, got {self.heartbeat_timeout}")
        if self.login_model not in (1, 2, 3, 4):
            raise ParamError(f"login_model must be 1..4, got {self.login_model}")


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str | None = None
    host: str = "127.0.0.1"
    tcp_port: int = 9000
    ws_port: int = 19000
    http_port: int = 8000
    node_id: str | None = None
    heartbeat_timeout: float = 30.0
    node_ttl: float = 10.0
    offline_grace: float = 3.0
    prefix: str = "presence"
    inbox_maxlen: int = 100
    inbox_ttl: float = 86400.0
    apps: Mapping[int, AppConfig] = field(default_factory=dict)
    dev_mode: bool = False

    def app(self, app_id: int) -> AppConfig | None:
        return self.apps.get(app_id)

    def heartbeat_timeout_for(self, app_id: int) -> float:
        """The app's own heartbeat timeout if it sets one, else the global (seconds, 0 = never)."""
        app = self.apps.get(app_id)
        return self.heartbeat_timeout if app is None or app.heartbeat_timeout is None else app.heartbeat_timeout


_ENV = {
    "redis_url": ("PRESENCE_REDIS_URL", "REDIS_URL"),
    "host": ("PRESENCE_HOST",),
    "tcp_port": ("PRESENCE_TCP_PORT",),
    "ws_port": ("PRESENCE_WS_PORT",),
    "http_port": ("PRESENCE_HTTP_PORT",),
    "node_id": ("PRESENCE_NODE_ID",),
    "heartbeat_timeout": ("PRESENCE_HEARTBEAT_TIMEOUT",),
    "node_ttl": ("PRESENCE_NODE_TTL",),
    "offline_grace": ("PRESENCE_OFFLINE_GRACE",),
    "prefix": ("PRESENCE_PREFIX",),
    "inbox_maxlen": ("PRESENCE_INBOX_MAXLEN",),
    "inbox_ttl": ("PRESENCE_INBOX_TTL",),
}
_TYPES = {f.name: f.type for f in fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    kind = _TYPES[name]
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError):
        raise ParamError(f"{name} must be a number, got {value!r}") from None
    return None if value in ("", None) else str(value)


def parse_apps_env(text: str) -> dict[int, AppConfig]:
    """``"10000:key,10001:other"`` -> apps with default settings."""
    apps: dict[int, AppConfig] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        app_id, sep, key = item.partition(":")
        if not sep or not app_id.strip().isdigit() or not key:
            raise ParamError(f"PRESENCE_APPS entries look like 10000:privateKey, got {item!r}")
        apps[int(app_id)] = AppConfig(private_key=key)
    return apps


def _app_heartbeat(app_id: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamError(f"[apps.{app_id}] heartbeat_timeout must be a number of seconds, got {value!r}")
    return float(value)


def _apps_from_toml(table: Mapping[str, Any]) -> dict[int, AppConfig]:
    apps = {}
    for app_id, conf in table.items():
        if not str(app_id).isdigit():
            raise ParamError(f"[apps.{app_id}]: the app id must be an integer")
        apps[int(app_id)] = AppConfig(
            private_key=str(conf.get("private_key", "")),
            admins=tuple(conf.get("admins", ("admin",))),
            login_model=int(conf.get("login_model", 3)),
            unsigned_login=bool(conf.get("unsigned_login", False)),
            heartbeat_timeout=_app_heartbeat(app_id, conf.get("heartbeat_timeout")),
        )
    return apps


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build Settings: defaults < TOML file < environment < ``overrides`` (None means unset)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    apps: dict[int, AppConfig] = {}
    config_file = config_file or env.get("PRESENCE_CONFIG")
    if config_file:
        data = tomllib.loads(Path(config_file).read_text())
        apps.update(_apps_from_toml(data.pop("apps", {})))
        for name, value in data.items():
            if name not in _ENV:
                raise ParamError(f"{config_file}: unknown setting {name!r}")
            values[name] = _coerce(name, value)
    for name, names in _ENV.items():
        for var in names:
            if env.get(var):
                values[name] = _coerce(name, env[var])
                break
    if env.get("PRESENCE_APPS"):
        apps.update(parse_apps_env(env["PRESENCE_APPS"]))
    for name, value in overrides.items():
        if value is not None:
            values[name] = _coerce(name, value)
    settings = Settings(**values, apps=apps)
    for name in ("heartbeat_timeout", "node_ttl", "offline_grace", "inbox_ttl"):
        if getattr(settings, name) < 0:
            raise ParamError(f"{name} must not be negative")
    return settings


def with_dev_app(settings: Settings) -> Settings:
    """No app configured: dev mode with app 10000 and a random key."""
    if settings.apps:
        return settings
    app = AppConfig(private_key=secrets.token_urlsafe(24))
    return replace(settings, apps={DEV_APP_ID: app}, dev_mode=True)
