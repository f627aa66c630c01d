"""TCP and WebSocket gateway.

- ``codec``: the seed's frames, bytes in and out (sans I/O).
- ``session``: one connection's protocol (sans I/O): its ``State``, frames in, requests and replies out.
- ``connection``: the asyncio side shared by both transports: serves a session's requests in order.
- ``tcp`` / ``ws``: the transports; each owns its writes and their back-pressure.
- ``outbound``: a message encoded once per wire format (pack cache, WebSocket framing).
- ``delivery``: doorbells, the dirty set, inbox reads and dispatch to local connections, inbox trims.
- ``hub``: the registry of local connections and the life cycle of their sessions.

The Redis side of inboxes and doorbells is ``presence.inbox``.
"""
