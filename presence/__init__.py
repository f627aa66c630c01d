"""presence: a Redis-native presence service (online sessions, custom status, push fan-out)."""

from presence.config import AppConfig, Settings, load_settings
from presence.errors import AuthError, ParamError, PresenceError
from presence.keys import KeySchema
from presence.service import Limits, Presence

__all__ = [
    "AppConfig",
    "AuthError",
    "KeySchema",
    "Limits",
    "ParamError",
    "Presence",
    "PresenceError",
    "Settings",
    "load_settings",
]
__version__ = "0.1.0"
