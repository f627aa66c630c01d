"""The REST app (aiohttp): one handler per endpoint; a middleware maps every error to the seed's envelope.

Contract: ``http/openapi.yaml`` (served at ``GET /openapi.yaml``). Every API call is ``POST`` JSON with the
query parameters ``appId``, ``identifier`` and ``userSign``; every answer, success or error, is
``{"code": ..., "msg": ..., "data": ...}`` with a real HTTP status. Handlers only authenticate, decode and
call the ``Presence`` facade, which owns validation of values and every Redis key.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote_to_bytes

import msgspec
from aiohttp import web
from prometheus_client import generate_latest

from presence.appkeys import OPENAPI_SPEC, PRESENCE, SETTINGS
from presence.auth import generate_user_sign, verify_user_sign
from presence.bounded import MAX_JSON_DEPTH, too_deep
from presence.config import DEV_APP_ID, AppConfig, Settings
from presence.errors import AuthError, Code, ForbiddenError, ParamError, PresenceError
from presence.http.demo import add_demo_routes, ws_url_on_port
from presence.ids import check_user_id
from presence.library import library_health, library_version
from presence.metrics import ONLINE_SESSIONS, ONLINE_USERS, REGISTRY, REST_REQUESTS
from presence.models import (
    AddFriendReq,
    DeleteFriendReq,
    ErrorVO,
    ImportFriendReq,
    OnlineCount,
    PullFriendOnlineStatusReq,
    PullUserOnlineStatusReq,
    ResponseVO,
    SetUserCustomerStatusReq,
    SubscribeUserOnlineStatusReq,
    UnsubscribeUserOnlineStatusReq,
)
from presence.resources import resource_path
from presence.service import Presence

log = logging.getLogger("presence.http")

# A REST request's body (aiohttp's client_max_size). The gateway bounds a frame's body on its own
# (presence/gateway/codec.py MAX_BODY): the same 64 KiB today, another transport's buffer.
MAX_BODY_BYTES = 64 * 1024
HEALTH_TIMEOUT_S = 2.0
# Pinned to the text-format version every scraper accepts (prometheus_client's CONTENT_TYPE_LATEST now says 1.0.0).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_APP_ID = re.compile(r"[0-9]{1,18}")
GAUGE_REFRESH_S = 5.0


@dataclass
class GaugeClock:
    """When ``/metrics`` last read the online gauges from Redis (monotonic seconds)."""

    read_at: float = -GAUGE_REFRESH_S


GAUGE_CLOCK = web.AppKey("gauge_clock", GaugeClock)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

# Built once: msgspec decoders and the encoder are reusable and much faster than building per request.
_ENCODER = msgspec.json.Encoder()
_ANY = msgspec.json.Decoder()
_SUBSCRIBE = msgspec.json.Decoder(SubscribeUserOnlineStatusReq)
_UNSUBSCRIBE = msgspec.json.Decoder(UnsubscribeUserOnlineStatusReq)
_SET_STATUS = msgspec.json.Decoder(SetUserCustomerStatusReq)
_QUERY_FRIENDS = msgspec.json.Decoder(PullFriendOnlineStatusReq)
_QUERY_USERS = msgspec.json.Decoder(PullUserOnlineStatusReq)
_ADD_FRIEND = msgspec.json.Decoder(AddFriendReq)
_DELETE_FRIEND = msgspec.json.Decoder(DeleteFriendReq)
_IMPORT_FRIEND = msgspec.json.Decoder(ImportFriendReq)


# --- response data that is not already a facade model ---


class StatusChangeData(msgspec.Struct, kw_only=True):
    """setUserCustomerStatus: whether the stored status changed and how many pushes it caused."""

    changed: bool
    recipients: int
    delivered: int


class AddedData(msgspec.Struct):
    added: int


class RemovedData(msgspec.Struct):
    removed: int


class DevSignData(msgspec.Struct):
    appId: int
    userId: str
    userSign: str


# --- helpers ---


def envelope(data: object = None, *, code: int = Code.SUCCESS, msg: str = "success", status: int = 200) -> web.Response:
    """The seed's ``{code, msg, data}`` as a JSON response."""
    return web.Response(
        body=_ENCODER.encode(ResponseVO(int(code), msg, data)),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )


def new_request_id() -> str:
    """The id that ties an error the client saw to its line in our log."""
    return secrets.token_hex(8)


def error_envelope(request: web.Request, code: int, msg: str, status: int) -> web.Response:
    """An error envelope with ``requestId`` (also in the ``X-Request-Id`` header), logged under that id."""
    rid = new_request_id()
    log.debug("request %s: %s %s -> %s %s %s", rid, request.method, request.rel_url.raw_path, status, int(code), msg)
    response = web.Response(
        body=_ENCODER.encode(ErrorVO(int(code), msg, None, rid)),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )
    response.headers["X-Request-Id"] = rid
    return response


def system_error(request: web.Request, detail: str, *, exc_info: bool = False, status: int = 500) -> web.Response:
    """``status`` (500, or 503 when Redis is away: a client may retry) with the seed's ``system error`` code and
    a request id; what went wrong goes only to the log, under that id."""
    response = error_envelope(request, Code.SYSTEM_ERROR, "system error", status)
    rid = response.headers["X-Request-Id"]
    # The raw (still percent-encoded) path: a decoded one could carry a newline into the log.
    log.error("request %s: %s %s failed: %s", rid, request.method, request.rel_url.raw_path, detail, exc_info=exc_info)
    return response


class Caller(NamedTuple):
    app_id: int
    identifier: str
    app: AppConfig

    @property
    def is_admin(self) -> bool:
        return self.identifier in self.app.admins


def authenticate(request: web.Request) -> Caller:
    """Check ``appId``, ``identifier`` and ``userSign`` in the seed's order; AuthError (401) otherwise."""
    query = request.query
    raw_app = query.get("appId", "")
    if not raw_app:
        raise AuthError("appId is missing", Code.APP_ID_MISSING)
    # int() alone would also take " 1", "1_0" and non-ASCII digits.
    if not _APP_ID.fullmatch(raw_app):
        raise AuthError(f"appId must be a decimal integer, got {raw_app[:32]!r}", Code.APP_ID_MISSING)
    app_id = int(raw_app)
    app = request.app[SETTINGS].app(app_id)
    if app is None:
        raise AuthError(f"appId {app_id} is not a configured app", Code.APP_ID_MISSING)
    identifier = query.get("identifier", "")
    if not identifier:
        raise AuthError("identifier is missing", Code.IDENTIFIER_MISSING)
    user_sign = query.get("userSign", "")
    if not user_sign:
        raise AuthError("userSign is missing", Code.USER_SIGN_MISSING)
    verify_user_sign(user_sign, app_id, app.private_key, identifier)
    check_user_id("identifier", identifier)  # a sign issued for a bad id is still refused
    return Caller(app_id, identifier, app)


def require_admin(caller: Caller, action: str) -> None:
    if not caller.is_admin:
        raise ForbiddenError(f"{action} needs an admin of app {caller.app_id}; {caller.identifier!r} is not one")


async def decode_body(request: web.Request, decoder: msgspec.json.Decoder[T]) -> T:
    """The JSON body as the request model; an empty body counts as ``{}``; unknown fields are ignored."""
    # Refuse a declared oversize body before reading it; read() enforces the same limit for chunked ones.
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, request.content_length)
    raw = await request.read() or b"{}"
    try:
        raw.decode("utf-8")  # all of it, ignored fields included (msgspec only checks what it keeps)
    except UnicodeDecodeError as exc:
        raise ParamError(f"body is not valid UTF-8 (byte {exc.start})") from None
    if too_deep(raw):
        raise ParamError(f"body is JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:  # names rule and path: "Expected `int`, got `str` - at `$.subTime`"
        if "got `float`" not in str(exc):
            raise ParamError(str(exc)) from None
        error = exc
    except msgspec.DecodeError as exc:
        raise ParamError(str(exc)) from None
    except UnicodeDecodeError:  # msgspec checks UTF-8 inside strings itself, with this error
        raise ParamError("body is not valid UTF-8") from None
    except RecursionError:  # unreachable after too_deep; kept so no parser error can become a 500
        raise ParamError("JSON is nested too deeply") from None
    # JSON Schema (and the seed's Jackson) take 3.0 as the integer 3; strict msgspec does not. Slow path only.
    try:
        converted: T = msgspec.convert(_integral(_ANY.decode(raw)), decoder.type)  # Decoder.type is typed Any
        return converted
    except msgspec.ValidationError as exc:  # another field is wrong too
        raise ParamError(str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise ParamError(str(error)) from None


def _integral(value: object) -> object:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


# --- middlewares ---


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request by route template (bounded label set) and final status."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = "500"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    except asyncio.CancelledError:
        status = "499"  # the client went away (nginx's convention)
        raise
    finally:
        REST_REQUESTS.labels(route, status).inc()


def check_query(request: web.Request) -> None:
    """ParamError naming the parameter when a query name or value is not UTF-8 once percent-decoded.

    aiohttp (yarl) would decode such bytes to U+FFFD, so ``identifier=%FF`` and ``%FE`` would be the same.
    """
    raw = request.rel_url.raw_query_string
    if "%" not in raw:  # only percent-escapes can carry bytes that are not UTF-8
        return
    for pair in raw.split("&"):
        name, _, value = pair.partition("=")
        for part in (name, value):
            try:
                unquote_to_bytes(part.replace("+", " ")).decode("utf-8")
            except UnicodeDecodeError:
                shown = name if name.isascii() and name.isprintable() else repr(name)
                raise ParamError(f"query parameter {shown[:64]} is not valid UTF-8 once percent-decoded") from None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes an envelope with a seed code and a real HTTP status; never a stack trace."""
    try:
        check_query(request)
        return await handler(request)
    except PresenceError as exc:
        if exc.http_status >= 500:  # its message may quote Redis: only the log gets it
            return system_error(request, exc.message, status=exc.http_status)
        return error_envelope(request, exc.code, exc.message, exc.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(request, exc)
    except Exception as exc:
        return system_error(request, f"unhandled {type(exc).__name__}", exc_info=True)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        return error_envelope(request, Code.NOT_FOUND, f"no such endpoint: {request.path}", 404)
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        msg = f"method {request.method} is not allowed here; use {allowed}"
        response = error_envelope(request, Code.PARAMETER_ERROR, msg, 405)
        response.headers["Allow"] = allowed
        return response
    if exc.status == 413:
        msg = f"request body is larger than {MAX_BODY_BYTES} bytes"
        return error_envelope(request, Code.PARAMETER_ERROR, msg, 413)
    if exc.status >= 500:
        return system_error(request, f"HTTP {exc.status} {exc.reason}")
    return error_envelope(request, Code.PARAMETER_ERROR, exc.reason, exc.status)


# --- malformed HTTP: answered by aiohttp's parser before any middleware runs ---

MALFORMED_LOG_INTERVAL = 10.0  # seconds between "malformed HTTP" log lines


class EnvelopeRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, with its answer to a request its parser refuses (a request line or
    header over 8190 bytes, a bad method, a bad chunk size, Content-Length with Transfer-Encoding) made
    an error envelope that does not echo the input, logged as one rate-limited line without traceback.

    aiohttp answers these in ``RequestHandler.handle_error`` (plain text quoting the input, and a logged
    traceback) before the app, its middlewares or its signals see the request, and offers no public
    hook for it: overriding that method of the exported ``web.RequestHandler`` is the narrowest way.
    """

    __slots__ = ()
    _since_log = 0
    _logged_at = -MALFORMED_LOG_INTERVAL

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        rid = new_request_id()
        what = type(exc).__name__ if exc is not None else "error"
        cls = EnvelopeRequestHandler
        cls._since_log += 1
        now = time.monotonic()
        if now - cls._logged_at >= MALFORMED_LOG_INTERVAL:
            # The class name and the peer only: the exception's text quotes what the client sent.
            log.warning(
                "request %s: malformed HTTP request from %s answered %d (%s); %d such since the last report",
                rid,
                request.remote,
                status,
                what,
                cls._since_log,
            )
            cls._logged_at, cls._since_log = now, 0
        if request.writer.output_size > 0:  # an answer has begun: the connection can only be dropped
            raise ConnectionError("response already started")
        if status >= 500:
            code, msg = Code.SYSTEM_ERROR, "system error"
        else:
            code, msg = Code.PARAMETER_ERROR, f"malformed HTTP request ({what})"
        response = web.Response(
            body=_ENCODER.encode(ErrorVO(int(code), msg, None, rid)),
            status=status,
            content_type="application/json",
            charset="utf-8",
        )
        response.headers["X-Request-Id"] = rid
        response.force_close()
        return response


# --- API handlers ---

routes = web.RouteTableDef()


@routes.post("/v1/user/subscribeUserOnlineStatus")
async def subscribe_user_online_status(request: web.Request) -> web.Response:
    caller = authenticate(request)
    req = await decode_body(request, _SUBSCRIBE)
    result = await request.app[PRESENCE].subscribe(caller.app_id, caller.identifier, req.subUserId, req.subTime)
    return envelope(result)


@routes.post("/v1/user/querySubscriptions")
async def query_subscriptions(request: web.Request) -> web.Response:
    caller = authenticate(request)
    await decode_body(request, _QUERY_FRIENDS)  # no fields
    return envelope(await request.app[PRESENCE].subscriptions(caller.app_id, caller.identifier))


@routes.post("/v1/user/unsubscribeUserOnlineStatus")
async def unsubscribe_user_online_status(request: web.Request) -> web.Response:
    caller = authenticate(request)
    req = await decode_body(request, _UNSUBSCRIBE)
    removed = await request.app[PRESENCE].unsubscribe(caller.app_id, caller.identifier, req.subUserId)
    return envelope(RemovedData(removed))


@routes.post("/v1/user/setUserCustomerStatus")
async def set_user_customer_status(request: web.Request) -> web.Response:
    caller = authenticate(request)
    req = await decode_body(request, _SET_STATUS)
    # The seed took userId from the body alone, so anyone could set anyone's status.
    user_id = caller.identifier if req.userId is None else req.userId
    if user_id != caller.identifier:
        require_admin(caller, "setting another user's status")
    result = await request.app[PRESENCE].set_custom_status(caller.app_id, user_id, req.customStatus, req.customText)
    return envelope(StatusChangeData(changed=result.changed, recipients=result.recipients, delivered=result.delivered))


@routes.post("/v1/user/queryFriendOnlineStatus")
async def query_friend_online_status(request: web.Request) -> web.Response:
    caller = authenticate(request)
    await decode_body(request, _QUERY_FRIENDS)  # no fields, but a body that is not an object is still an error
    return envelope(await request.app[PRESENCE].query_friends(caller.app_id, caller.identifier))


@routes.post("/v1/user/queryUserOnlineStatus")
async def query_user_online_status(request: web.Request) -> web.Response:
    caller = authenticate(request)
    req = await decode_body(request, _QUERY_USERS)
    return envelope(await request.app[PRESENCE].query_users(caller.app_id, req.userList))


@routes.post("/v1/user/queryOnlineCount")
async def query_online_count(request: web.Request) -> web.Response:
    """The app's users online and sessions by clientType, exact (an app admin only: app-wide numbers)."""
    caller = authenticate(request)
    require_admin(caller, "queryOnlineCount")
    await decode_body(request, _QUERY_FRIENDS)  # no fields
    counts = await request.app[PRESENCE].counters.online_counts()
    return envelope(counts.get(caller.app_id, OnlineCount()))


@routes.post("/v1/friendship/addFriend")
async def add_friend(request: web.Request) -> web.Response:
    caller = authenticate(request)
    require_admin(caller, "addFriend")
    req = await decode_body(request, _ADD_FRIEND)
    return envelope(AddedData(await request.app[PRESENCE].add_friend(caller.app_id, req.fromId, req.toItem.toId)))


@routes.post("/v1/friendship/deleteFriend")
async def delete_friend(request: web.Request) -> web.Response:
    caller = authenticate(request)
    require_admin(caller, "deleteFriend")
    req = await decode_body(request, _DELETE_FRIEND)
    return envelope(RemovedData(await request.app[PRESENCE].delete_friend(caller.app_id, req.fromId, req.toId)))


@routes.post("/v1/friendship/importFriend")
async def import_friend(request: web.Request) -> web.Response:
    caller = authenticate(request)
    require_admin(caller, "importFriend")
    req = await decode_body(request, _IMPORT_FRIEND)
    to_ids = [item.toId for item in req.friendItem]
    return envelope(AddedData(await request.app[PRESENCE].import_friends(caller.app_id, req.fromId, to_ids)))


# --- operations ---


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Ready when the store can serve: 503 only when no primary answers with our function library in time.

    Every primary (one on standalone and Sentinel) is asked ``presence_version`` in parallel: a primary that
    lost its functions (FUNCTION FLUSH, an empty restart) gets the library loaded again by the check. While
    some cluster primaries do not answer (a shard failing over) it is 200 ``degraded`` naming them: every
    gateway shares the store, so taking this one out of the load balancer would not help, and the answer
    does not flap with whichever node was asked. Another library version (a rolling deploy) is usable: 200
    naming it.
    """
    presence = request.app[PRESENCE]
    try:
        nodes = await library_health(presence.store, HEALTH_TIMEOUT_S)
    except Exception as exc:  # e.g. the cluster's node map cannot be read at all
        nodes = [("redis", exc)]
    failed = [(node, answer) for node, answer in nodes if isinstance(answer, BaseException)]
    if len(failed) == len(nodes):
        log.warning("healthz: redis or its presence library is unusable: %r", failed[0][1])
        reason = f"redis: {type(failed[0][1]).__name__}"
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)
    body: dict[str, object] = {"status": "ok"}
    if failed:
        log.warning("healthz: primaries not answering: %s", ", ".join(f"{n} ({a!r})" for n, a in failed))
        body = {"status": "degraded", "unavailable": sorted(node for node, _ in failed)}
    others = sorted({a for _, a in nodes if isinstance(a, str) and a != library_version()})
    if others:
        # Usable (changes are additive), and during a rolling deploy one version replaces the other: say so,
        # but do not take every node of the other version out of the load balancer.
        log.warning("healthz: redis runs presence library %s, this node ships %s", others[0], library_version())
        body["library"] = others[0]
    return web.json_response(body)


async def refresh_online_gauges(presence: Presence, apps: Iterable[int]) -> None:
    """``presence_online_users{app}`` and ``presence_online_sessions{app,client_type}`` from the counters."""
    counts = await presence.counters.online_counts()
    for app_id in sorted(set(apps) | set(counts)):
        count = counts.get(app_id, OnlineCount())
        ONLINE_USERS.labels(str(app_id)).set(count.onlineUsers)
        for ct in range(6):
            ONLINE_SESSIONS.labels(str(app_id), str(ct)).set(count.sessionsByClientType.get(str(ct), 0))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    # The online gauges are read from Redis at most every GAUGE_REFRESH_S (a cluster has a counter per slot).
    now, clock = time.monotonic(), request.app[GAUGE_CLOCK]
    if now - clock.read_at >= GAUGE_REFRESH_S:
        clock.read_at = now
        try:
            await refresh_online_gauges(request.app[PRESENCE], request.app[SETTINGS].apps)
        except PresenceError as exc:
            log.warning("online gauges not refreshed: %s", exc.message)
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": METRICS_CONTENT_TYPE})


@routes.get("/openapi.yaml")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_SPEC], content_type="application/yaml", charset="utf-8")


# --- dev mode only: the demo page needs a userSign and a friend without an admin tool ---

dev_routes = web.RouteTableDef()


def _dev_app_id(settings: Settings) -> int:
    return DEV_APP_ID if DEV_APP_ID in settings.apps else min(settings.apps)


@dev_routes.get("/v1/dev/userSign")
async def dev_user_sign(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    user_id = check_user_id("userId", request.query.get("userId", ""))
    app_id = _dev_app_id(settings)
    key = settings.apps[app_id].private_key
    return envelope(DevSignData(app_id, user_id, generate_user_sign(app_id, key, user_id)))


@dev_routes.post("/v1/dev/friends")
async def dev_friends(request: web.Request) -> web.Response:
    user_id = check_user_id("userId", request.query.get("userId", ""))
    friend_id = check_user_id("friendId", request.query.get("friendId", ""))
    if friend_id == user_id:
        raise ParamError("friendId must differ from userId")
    app_id = _dev_app_id(request.app[SETTINGS])
    return envelope(AddedData(await request.app[PRESENCE].add_friend(app_id, user_id, friend_id)))


def create_app(presence: Presence, settings: Settings) -> web.Application:
    """The REST application; run it with ``web.AppRunner`` (or ``web.run_app``) next to the gateway."""
    app = web.Application(middlewares=[metrics_middleware, error_middleware], client_max_size=MAX_BODY_BYTES)
    app[PRESENCE] = presence
    app[SETTINGS] = settings
    app[GAUGE_CLOCK] = GaugeClock()
    # Read once at start: a missing contract fails the start, not the first request for it.
    app[OPENAPI_SPEC] = resource_path("http/openapi.yaml").read_bytes()
    app.add_routes(routes)
    if settings.dev_mode and settings.apps:
        log.warning("dev mode: /v1/dev/userSign and /v1/dev/friends are open to anyone who reaches this port")
        app.add_routes(dev_routes)
        add_demo_routes(app, ws_url_for=ws_url_on_port(settings.ws_port))
    return app
