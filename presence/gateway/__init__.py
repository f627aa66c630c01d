"""TCP and WebSocket gateway."""
