"""Settings: defaults < TOML < environment < flags; apps from PRESENCE_APPS or [apps.N]; dev mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from presence.config import DEV_APP_ID, describe_apps, load_settings, with_dev_app
from presence.errors import ParamError
from presence.limits import MAX_SESSIONS
from presence.webhooks import group_name


def toml_error(tmp_path: Path, toml: str) -> str:
    """What load_settings refuses a settings file holding ``toml`` with; the message names the file."""
    conf = tmp_path / "presence.toml"
    conf.write_text(toml)
    with pytest.raises(ParamError) as info:
        load_settings(conf, env={})
    assert str(conf) in info.value.message
    return info.value.message


def test_defaults_match_the_design() -> None:
    s = load_settings(env={})
    assert (s.tcp_port, s.ws_port, s.http_port) == (9000, 19000, 8000)
    assert (s.heartbeat_timeout, s.node_ttl, s.offline_grace) == (30, 10, 3)
    assert s.redis_url is None and s.apps == {}
    assert (s.resume_window, s.workers) == (60, 1)


def test_precedence_toml_env_flags(tmp_path: Path) -> None:
    conf = tmp_path / "presence.toml"
    conf.write_text(
        'tcp_port = 1\nws_port = 2\nnode_ttl = 5\n[apps.10001]\nprivate_key = "k1"\nadmins = ["root"]\n'
        "login_model = 1\nunsigned_login = true\n"
    )
    env = {
        "PRESENCE_WS_PORT": "20",
        "REDIS_URL": "redis://b",
        "PRESENCE_REDIS_URL": "redis://a",
        "PRESENCE_APPS": "10000:k0",
    }
    s = load_settings(conf, env=env, tcp_port=None, node_ttl=7)
    assert (s.tcp_port, s.ws_port, s.node_ttl, s.redis_url) == (1, 20, 7, "redis://a")
    assert s.apps[10001].admins == ("root",) and s.apps[10001].login_model == 1 and s.apps[10001].unsigned_login
    assert s.apps[10000].private_key == "k0" and s.apps[10000].login_model == 3


def test_an_app_without_max_sessions_gets_the_librarys_default() -> None:
    s = load_settings(env={"PRESENCE_APPS": "10000:k0"})
    assert s.apps[10000].max_sessions == MAX_SESSIONS  # what presence_login defaults to (tests/test_limits.py)


def test_every_setting_reads_its_documented_environment_variable() -> None:
    """The README's table: each setting from ``PRESENCE_<NAME>``, text decoded to the setting's type."""
    env = {
        "PRESENCE_REDIS_URL": "redis://h:1/0",
        "PRESENCE_HOST": "0.0.0.0",
        "PRESENCE_TCP_PORT": "1",
        "PRESENCE_WS_PORT": "2",
        "PRESENCE_HTTP_PORT": "3",
        "PRESENCE_NODE_ID": "n1",
        "PRESENCE_HEARTBEAT_TIMEOUT": "12",
        "PRESENCE_NODE_TTL": "4",
        "PRESENCE_OFFLINE_GRACE": "0.5",
        "PRESENCE_LOGIN_TIMEOUT": "0",
        "PRESENCE_MAX_CONNECTIONS": "100",
        "PRESENCE_FD_RESERVE": "64",
        "PRESENCE_PREFIX": "p",
        "PRESENCE_INBOX_MAXLEN": "50",
        "PRESENCE_INBOX_TTL": "600",
        "PRESENCE_RESUME_WINDOW": "30",
        "PRESENCE_WORKERS": "2",
        "PRESENCE_REDIS_TIMEOUT": "2.5",
        "PRESENCE_REDIS_RETRY_FOR": "7",
        "PRESENCE_FEED_SHARDS": "8",
        "PRESENCE_FEED_MAXLEN": "500",
        "PRESENCE_WEBHOOK_ATTEMPTS": "3",
        "PRESENCE_WEBHOOK_BACKOFF": "1",
        "PRESENCE_WEBHOOK_TIMEOUT": "9",
        "PRESENCE_DEV_KEY": "dk",
    }
    s = load_settings(env=env)
    assert (s.redis_url, s.host, s.tcp_port, s.ws_port, s.http_port, s.node_id) == (
        "redis://h:1/0", "0.0.0.0", 1, 2, 3, "n1"
    )  # fmt: skip
    assert (s.heartbeat_timeout, s.node_ttl, s.offline_grace, s.login_timeout) == (12, 4, 0.5, 0)
    assert (s.max_connections, s.fd_reserve, s.prefix, s.inbox_maxlen, s.inbox_ttl) == (100, 64, "p", 50, 600)
    assert (s.resume_window, s.workers, s.redis_timeout, s.redis_retry_for) == (30, 2, 2.5, 7)
    assert (s.feed_shards, s.feed_maxlen, s.webhook_attempts, s.webhook_backoff, s.webhook_timeout) == (8, 500, 3, 1, 9)
    assert s.dev_key == "dk" and not s.dev_mode
    assert load_settings(env={"REDIS_URL": "redis://r"}).redis_url == "redis://r"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PRESENCE_APPS": "10000"}, "PRESENCE_APPS entries look like"),
        ({"PRESENCE_TCP_PORT": "nine"}, "PRESENCE_TCP_PORT: Expected `int`, got `str` - at `tcp_port`"),
        ({"PRESENCE_OFFLINE_GRACE": "-1"}, "PRESENCE_OFFLINE_GRACE: Expected `float` >= 0.0 - at `offline_grace`"),
        ({"PRESENCE_WORKERS": "0"}, "PRESENCE_WORKERS: Expected `int` >= 1 - at `workers`"),
        (
            {"PRESENCE_RESUME_WINDOW": "5", "PRESENCE_OFFLINE_GRACE": "10"},
            r"resume_window must be at least offline_grace and node_ttl plus 1 s \(11 s here\), got 5",
        ),
    ],
)
def test_bad_settings_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(ParamError, match=message):
        load_settings(env=env)


def test_bad_login_model_in_toml(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text('[apps.1]\nprivate_key = "k"\nlogin_model = 9\n')
    with pytest.raises(ParamError, match=r"p\.toml: Expected `int` <= 4 - at `apps\.1\.login_model`"):
        load_settings(conf, env={})


def test_dev_mode_only_without_apps() -> None:
    dev = with_dev_app(load_settings(env={}))
    assert dev.dev_mode and list(dev.apps) == [DEV_APP_ID] and len(dev.apps[DEV_APP_ID].private_key) > 20
    configured = with_dev_app(load_settings(env={"PRESENCE_APPS": "5:k"}))
    assert not configured.dev_mode and list(configured.apps) == [5]


# --- strict decoding (issue 12): a wrong type is a start-up error naming the field and the file ---


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[apps.10001]\nprivate_key = "k"\nunsigned_login = "false"\n',
            "`bool`, got `str` - at `apps.10001.unsigned_login`",
        ),
        ('[apps.10001]\nprivate_key = "k"\nadmins = "admin"\n', "`array`, got `str` - at `apps.10001.admins`"),
        ('[apps.10001]\nprivate_key = "k"\nmax_sessions = 0\n', "`int` >= 1 - at `apps.10001.max_sessions`"),
        ('[apps.10001]\nprivate_key = "k"\nadmin = ["root"]\n', "unknown field `admin` - at `apps.10001`"),
        ('[apps.10001]\nadmins = ["root"]\n', "missing required field `private_key` - at `apps.10001`"),
        ('heartbeat_timeout = "30"\n', "`float`, got `str` - at `heartbeat_timeout`"),
        ("login_timeout = -1\n", "`float` >= 0.0 - at `login_timeout`"),
        ("tcp_prot = 9000\n", "unknown setting `tcp_prot`"),
        ("apps = 3\n", "apps must be a table"),
    ],
    ids=[
        "bool-as-string",
        "admins-as-string",
        "max-sessions-0",
        "unknown-app-field",
        "no-key",
        "float-as-string",
        "negative-login-timeout",
        "typo",
        "apps-not-table",
    ],
)
def test_wrong_type_in_toml_names_field_and_file(tmp_path: Path, toml: str, message: str) -> None:
    assert message in toml_error(tmp_path, toml)


def test_presence_apps_states_admins() -> None:
    apps = load_settings(env={"PRESENCE_APPS": "1:k1,2:key:with:colons:admins=alice|bob,3:k3:admins="}).apps
    assert apps[1].admins == ("admin",)  # the documented default, logged at start (test_hostile)
    assert apps[2].private_key == "key:with:colons" and apps[2].admins == ("alice", "bob")
    assert apps[3].admins == ()


def test_cli_start_up_error_names_field_and_file(tmp_path: Path) -> None:
    """``presence serve`` with a mistyped file refuses to start, with the reason on stderr."""
    import subprocess
    import sys

    conf = tmp_path / "bad.toml"
    conf.write_text('[apps.10001]\nprivate_key = "k"\nunsigned_login = "false"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "presence", "serve", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert f"{conf}: Expected `bool`, got `str` - at `apps.10001.unsigned_login`" in proc.stderr


def test_app_heartbeat_timeout_from_toml_defaults_to_the_global(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text(
        'heartbeat_timeout = 12\n[apps.1]\nprivate_key = "k"\nheartbeat_timeout = 0\n'
        '[apps.2]\nprivate_key = "k"\nheartbeat_timeout = 90.5\n[apps.3]\nprivate_key = "k"\n'
    )
    s = load_settings(conf, env={})
    assert [s.heartbeat_timeout_for(app) for app in (1, 2, 3, 4)] == [0, 90.5, 12, 12]
    assert s.apps[3].heartbeat_timeout is None


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1", "`float` >= 0.0 - at `apps.1.heartbeat_timeout`"), ('"30"', "got `str` - at `apps.1.heartbeat_timeout`")],
)
def test_bad_app_heartbeat_timeout(tmp_path: Path, value: str, message: str) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text(f'[apps.1]\nprivate_key = "k"\nheartbeat_timeout = {value}\n')
    with pytest.raises(ParamError, match=re.escape(message)):
        load_settings(conf, env={})


@pytest.mark.parametrize("node_id", ["gw 1", "a|b", "", "x" * 101])
def test_a_node_id_outside_the_brokerid_rule_is_refused_at_start(node_id: str) -> None:
    """Every session records its node id as brokerId ([A-Za-z0-9._:-]): a node whose logins would all be
    refused does not start."""
    with pytest.raises(ParamError, match="node_id"):
        load_settings(env={}, node_id=node_id)
    assert load_settings(env={}, node_id="gw-1.eu:a_b").node_id == "gw-1.eu:a_b"


# --- issue 12 follow-ups C and D: app ids, admins and numbers that used to crash or mean something else ---


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[apps."²"]\nprivate_key = "k"\n', "app id must be an integer 1..2147483647 in ASCII digits, got '²'"),
        ('[apps."٣"]\nprivate_key = "k"\n', "app id must be an integer 1..2147483647 in ASCII digits, got '٣'"),
        ('[apps.99999999999999999999]\nprivate_key = "k"\n', "app id must be an integer 1..2147483647"),
        ('[apps.2147483648]\nprivate_key = "k"\n', "app id must be an integer 1..2147483647"),
        ('[apps.0]\nprivate_key = "k"\n', "app id must be an integer 1..2147483647"),
        ('[apps.7]\nprivate_key = "k"\n[apps.007]\nprivate_key = "j"\n', "app 7 is given twice"),
        ('[apps.7]\nprivate_key = "k"\nadmins = ["a|b"]\n', "admins[0] must not contain '|'"),
        ('[apps.7]\nprivate_key = "k"\nadmins = ["ok", "\\n"]\n', "admins[1] must not contain '\\n'"),
        ("inbox_ttl = inf\n", "`float` <= 31536000.0 - at `inbox_ttl`"),
        ("node_ttl = 1e20\n", "`float` <= 86400.0 - at `node_ttl`"),
        (
            '[apps.7]\nprivate_key = "k"\nheartbeat_timeout = inf\n',
            "`float` <= 86400.0 - at `apps.7.heartbeat_timeout`",
        ),
    ],
    ids=[
        "superscript",
        "arabic-digit",
        "20-digits",
        "int32+1",
        "zero",
        "duplicate",
        "admin-pipe",
        "admin-newline",
        "inbox-ttl-inf",
        "node-ttl-1e20",
        "app-heartbeat-inf",
    ],
)
def test_followup_bad_app_ids_admins_and_numbers_in_toml(tmp_path: Path, toml: str, message: str) -> None:
    assert message in toml_error(tmp_path, toml)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PRESENCE_APPS": "²:key"}, "PRESENCE_APPS: the app id must be an integer 1..2147483647 in ASCII digits"),
        ({"PRESENCE_APPS": "99999999999999999999:key"}, "the app id must be an integer 1..2147483647"),
        ({"PRESENCE_APPS": "10000:a,10000:b"}, "PRESENCE_APPS: app 10000 is given twice"),
        ({"PRESENCE_APPS": "10000:a:admins=x{y"}, "PRESENCE_APPS entry 10000: admins[0] must not contain '{'"),
        ({"PRESENCE_INBOX_TTL": "inf"}, "PRESENCE_INBOX_TTL: Expected `float` <= 31536000.0 - at `inbox_ttl`"),
        ({"PRESENCE_INBOX_TTL": "1e20"}, "PRESENCE_INBOX_TTL: Expected `float` <= 31536000.0 - at `inbox_ttl`"),
        ({"PRESENCE_NODE_TTL": "inf"}, "PRESENCE_NODE_TTL: Expected `float` <= 86400.0 - at `node_ttl`"),
        (
            {"PRESENCE_INBOX_MAXLEN": "99999999999999999999999"},
            "PRESENCE_INBOX_MAXLEN: Expected `int` <= 1000000 - at `inbox_maxlen`",
        ),
        ({"PRESENCE_MAX_CONNECTIONS": "99999999999"}, "Expected `int` <= 10000000 - at `max_connections`"),
        ({"PRESENCE_FD_RESERVE": "99999999999"}, "Expected `int` <= 1000000 - at `fd_reserve`"),
    ],
)
def test_followup_bad_environment_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ParamError) as info:
        load_settings(env=env)
    assert message in info.value.message


def test_followup_presence_apps_admins_are_stripped() -> None:
    apps = load_settings(env={"PRESENCE_APPS": "10000:k:admins= alice | bob "}).apps
    assert apps[10000].admins == ("alice", "bob")


@pytest.mark.parametrize("env", [{"PRESENCE_INBOX_TTL": "inf"}, {"PRESENCE_APPS": "²:key"}])
def test_followup_serve_refuses_bad_numbers_and_app_ids_without_a_traceback(env: dict[str, str]) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "presence", "serve", "--tcp-port", "0", "--ws-port", "0", "--http-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert next(iter(env)) in proc.stderr


def test_dev_mode_keeps_its_key_across_restarts_with_presence_dev_key() -> None:
    kept = [with_dev_app(load_settings(env={"PRESENCE_DEV_KEY": "stay"})).apps[10000].private_key for _ in range(2)]
    assert kept == ["stay", "stay"]
    fresh = {with_dev_app(load_settings(env={})).apps[10000].private_key for _ in range(2)}
    assert len(fresh) == 2  # without it, a new key at each start


def test_feed_and_webhook_settings_from_environment_and_toml(tmp_path: Path) -> None:
    env = {"PRESENCE_FEED_SHARDS": "8", "PRESENCE_FEED_MAXLEN": "500", "PRESENCE_WEBHOOK_ATTEMPTS": "3"}
    s = load_settings(env=env)
    assert (s.feed_shards, s.feed_maxlen, s.webhook_attempts) == (8, 500, 3)
    conf = tmp_path / "p.toml"
    conf.write_text('[apps.1]\nprivate_key = "k"\nwebhook_urls = ["http://127.0.0.1:9/hook"]\n')
    assert load_settings(conf, env={}).apps[1].webhook_urls == ("http://127.0.0.1:9/hook",)
    conf.write_text('[apps.1]\nprivate_key = "k"\nwebhook_urls = ["ftp://x"]\n')
    with pytest.raises(ParamError, match="webhook_urls"):
        load_settings(conf, env={})


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::1", "not a usable URL"),
        ("http://127.0.0.1:99999/x", "not a usable URL"),
        ("http://127.0.0.1:0/x", "the port must be 1..65535"),
        ("https://:80/x", "not a usable URL|with a host"),
    ],
)
def test_unusable_webhook_urls_fail_the_start_naming_the_field(tmp_path: Path, url: str, reason: str) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text(f'[apps.1]\nprivate_key = "k"\nwebhook_urls = ["{url}"]\n')
    with pytest.raises(ParamError, match=rf"p\.toml: apps\.1\.webhook_urls\[0\]: ({reason})"):
        load_settings(conf, env={})


def test_a_webhook_url_given_twice_is_refused_and_credentials_are_never_shown(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text('[apps.1]\nprivate_key = "k"\nwebhook_urls = ["http://u:pw@h/x", "http://u:pw@h/x"]\n')
    with pytest.raises(ParamError, match=r"webhook_urls\[1\]: 'http://h/x' is given twice") as err:
        load_settings(conf, env={})
    assert "pw" not in err.value.message
    conf.write_text('[apps.1]\nprivate_key = "k"\nwebhook_urls = ["http://u:pw@h/x"]\n')
    settings = load_settings(conf, env={})
    (line,) = describe_apps(settings)
    assert "http://h/x" in line and "pw" not in line
    group = group_name(settings.apps[1].webhook_urls[0])
    assert "pw" not in group and group != group_name("http://u:other@h/x")  # a hash tells them apart
    assert group_name("http://h/x") == "webhook:http://h/x"  # URLs without credentials keep their group


def test_presence_serve_refuses_to_start_with_an_unusable_webhook_url(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text('[apps.1]\nprivate_key = "k"\nwebhook_urls = ["http://127.0.0.1:99999/x"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    out = subprocess.run(
        [sys.executable, "-m", "presence", "serve", "--config", str(conf), "--tcp-port", "0", "--ws-port", "0"],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "apps.1.webhook_urls[0]: not a usable URL (Port out of range" in out.stderr
    assert "presence listening" not in out.stdout
