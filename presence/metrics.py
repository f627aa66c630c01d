"""Prometheus metrics shared by the gateway, the REST app and the service facade."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Gauge("presence_connections", "Open client connections", ["transport"], registry=REGISTRY)
CONNECTIONS_REFUSED = Counter(
    "presence_connections_refused_total", "Connections refused at capacity", ["transport"], registry=REGISTRY
)
LOGIN_TIMEOUTS = Counter(
    "presence_login_timeouts_total", "Connections closed for sending no LOGIN in time", registry=REGISTRY
)
LOGINS = Counter("presence_logins_total", "Successful socket logins", ["transport"], registry=REGISTRY)
LOGOUTS = Counter("presence_logouts_total", "Sessions ended, by reason", ["reason"], registry=REGISTRY)
STATUS_CHANGES = Counter("presence_status_changes_total", "Status changes by kind", ["kind"], registry=REGISTRY)
FANOUT_ENTRIES = Counter("presence_fanout_entries_total", "Inbox entries written by fan-out", registry=REGISTRY)
# Pushes written to client sockets: one per inbox entry per local connection it reaches. Not the inbox entries
# a change wrote (FANOUT_ENTRIES, a status change's ``delivered``: one per recipient user, whatever its devices).
PUSHES_WRITTEN = Counter(
    "presence_pushes_written_total",
    "Pushes written to client connections (one per entry per connection)",
    registry=REGISTRY,
)
DOORBELLS = Counter("presence_doorbells_total", "Doorbell messages received by gateways", registry=REGISTRY)
REAPED_SESSIONS = Counter("presence_reaped_sessions_total", "Sessions logged out for dead nodes", registry=REGISTRY)
REDIS_LATENCY = Histogram(
    "presence_redis_call_seconds",
    "Latency of Redis function calls",
    ["function"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
REST_REQUESTS = Counter("presence_rest_requests_total", "REST requests", ["route", "status"], registry=REGISTRY)
FEED_ENTRIES = Counter("presence_feed_entries_total", "Change feed entries appended to feed shards", registry=REGISTRY)
ONLINE_USERS = Gauge("presence_online_users", "Users with at least one live session", ["app"], registry=REGISTRY)
ONLINE_SESSIONS = Gauge(
    "presence_online_sessions", "Live sessions by client type", ["app", "client_type"], registry=REGISTRY
)
WEBHOOK_SENT = Counter("presence_webhook_sent_total", "Webhook events delivered (2xx)", ["app"], registry=REGISTRY)
WEBHOOK_FAILED = Counter(
    "presence_webhook_failed_total", "Webhook attempts that failed (to be retried)", ["app"], registry=REGISTRY
)
WEBHOOK_DEAD = Counter(
    "presence_webhook_dead_total", "Webhook events moved to the dead-letter stream", ["app"], registry=REGISTRY
)
WEBHOOK_LAG = Gauge(
    "presence_webhook_lag_seconds",
    "Age of the event a webhook worker is delivering (0 when idle)",
    ["app"],
    registry=REGISTRY,
)
