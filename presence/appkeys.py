"""Typed aiohttp application keys that more than one module reads (the REST app, the demo routes, the WebSocket
app and the node app of ``presence.server``); a key only one module uses is declared there."""

from __future__ import annotations

from aiohttp import web

from presence.config import Settings
from presence.gateway.hub import Hub
from presence.service import Presence

PRESENCE = web.AppKey("presence", Presence)
SETTINGS = web.AppKey("settings", Settings)
OPENAPI_SPEC = web.AppKey("openapi_spec", bytes)  # http/openapi.yaml, read once when the REST app is built
HUB = web.AppKey("hub", Hub)
