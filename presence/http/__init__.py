"""The REST app: ``create_app(presence, settings)`` builds the aiohttp application (contract: http/openapi.yaml)."""

from presence.http.app import MAX_BODY_BYTES, create_app

__all__ = ["MAX_BODY_BYTES", "create_app"]
