"""Inbox reads: typed stream ids and entries, doorbells, and the reads, trims and resumes on real Redis."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from redis.asyncio import Redis

from presence.config import Settings
from presence.errors import ParamError, PresenceError
from presence.inbox import NO_EVENT, DoorbellSubscription, EventId, InboxEntry, Inboxes, parse_doorbell
from presence.service import Presence
from tests.clients import APP

IOS, PC = 2, 4

# --- event ids ------------------------------------------------------------------------------------------


def test_event_ids_order_as_redis_orders_entries_and_print_as_redis_writes_them() -> None:
    ids = [EventId.parse(v) for v in (b"9-1", "10-0", "10-2", b"10")]
    assert sorted(ids) == [EventId(9, 1), EventId(10, 0), EventId(10, 0), EventId(10, 2)]
    assert str(EventId(1700000000000, 3)) == "1700000000000-3" and str(NO_EVENT) == "0-0"
    with pytest.raises(ParamError, match="not a stream id"):
        EventId.parse("x-1")


@pytest.mark.parametrize(
    "value", ["0-99999999999999999999", "18446744073709551616-0", "1-1\n", "\u0661-\u0661", "1-", "-1", "5", 5, None]
)
def test_a_clients_last_event_id_must_be_one_redis_accepts(value: object) -> None:
    assert EventId.from_client(value) is None


def test_a_clients_last_event_id_up_to_uint64() -> None:
    top = (1 << 64) - 1
    assert EventId.from_client(f"{top}-{top}") == EventId(top, top)
    assert EventId.from_client("0-0") == NO_EVENT


# --- entries and doorbells ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flat", "target", "exclude"),
    [
        ([b"c", b"4004", b"d", b"{}"], None, None),
        ([b"c", b"9002", b"d", b"{}", b"t", b"conn-1"], "conn-1", None),
        ([b"c", b"4005", b"d", b"{}", b"x", b"conn-2"], None, "conn-2"),
        ([b"d", b"{}", b"x", b"conn-2", b"c", b"4005"], None, "conn-2"),  # another order: the fields by name
    ],
    ids=["everyone", "t-one-connection", "x-all-but-one", "any-order"],
)
def test_an_entry_is_parsed_once_into_its_typed_form(
    flat: list[bytes], target: str | None, exclude: str | None
) -> None:
    entry = InboxEntry.parse_flat(b"17-3", flat)
    assert entry == InboxEntry(EventId(17, 3), "17-3", int(flat[flat.index(b"c") + 1]), b"{}", target, exclude)


@pytest.mark.parametrize("flat", [[b"c", b"4004"], [b"d", b"{}"], [b"c", b"four", b"d", b"{}"]])
def test_an_entry_that_is_not_the_librarys_is_refused(flat: list[bytes]) -> None:
    with pytest.raises((KeyError, ValueError)):
        InboxEntry.parse_flat(b"1-0", flat)


def test_doorbell_is_json_framed() -> None:
    keys = ["presence:{1:a b}:inbox", "presence:{1:日本}:inbox", 'presence:{1:x"y}:inbox']
    assert parse_doorbell(json.dumps(keys).encode()) == keys
    assert parse_doorbell(b"k1\nk2") == ["k1", "k2"]  # a library loaded before the JSON framing
    with pytest.raises(msgspec.DecodeError):
        parse_doorbell(b'["unterminated')


# --- on Redis: standalone, fakeredis, cluster -----------------------------------------------------------


async def _online(presence: Presence, user: str, imei: str, node_id: str = "n1", client_type: int = IOS) -> EventId:
    result = await presence.login(APP, user, client_type, imei, conn_id=f"c-{user}-{imei}", node_id=node_id)
    return EventId.parse(result.inbox_last_id)


async def test_read_returns_the_librarys_entries_typed_after_each_cursor(presence: Presence) -> None:
    inboxes = Inboxes(presence.store, presence.keys)
    await presence.import_friends(APP, "alice", ["bob", "carol"])
    bob = await _online(presence, "bob", "phone")
    carol = await _online(presence, "carol", "phone")
    await _online(presence, "alice", "phone")
    await _online(presence, "bob", "pc", client_type=PC)  # a sync to bob's phone, not to the new pc (x)
    await presence.set_custom_status(APP, "alice", 2, "lunch")
    reads = dict(await inboxes.read({inboxes.key(APP, "bob"): bob, inboxes.key(APP, "carol"): carol}))
    assert set(reads) == {inboxes.key(APP, "bob"), inboxes.key(APP, "carol")}
    for inbox, entries in reads.items():
        raw = await presence.store.one(inbox, "XRANGE", inbox, "-", "+")
        assert [e.id_text for e in entries] == [i.decode() for i, _ in raw]
        assert all(EventId.parse(e.id_text) == e.id for e in entries)
    bobs = reads[inboxes.key(APP, "bob")]
    assert [e.command for e in bobs] == [4004, 4005, 4006]  # alice online, bob's own pc online, alice's status
    assert bobs[1].exclude == "c-bob-pc" and bobs[1].target is None
    assert msgspec.json.decode(bobs[2].data)["customText"] == "lunch"
    later = await inboxes.read({inboxes.key(APP, "bob"): bobs[1].id}, count=5)
    assert [[e.id for e in entries] for _, entries in later] == [[bobs[2].id]]
    assert await inboxes.read({inboxes.key(APP, "bob"): bobs[2].id}) in ([], [(inboxes.key(APP, "bob"), [])])


async def test_resume_needs_every_entry_after_the_id_still_there(presence: Presence) -> None:
    inboxes = Inboxes(presence.store, presence.keys)
    await presence.add_friend(APP, "alice", "bob")
    cursor = await _online(presence, "bob", "phone")
    for text in ("one", "two", "three"):
        await presence.set_custom_status(APP, "alice", 1, text)
    inbox = inboxes.key(APP, "bob")
    ((_, entries),) = await inboxes.read({inbox: cursor})
    assert await inboxes.can_resume(APP, "bob", cursor)
    await presence.store.one(inbox, "XDEL", inbox, entries[1].id_text)
    assert not await inboxes.can_resume(APP, "bob", entries[0].id)  # the entry after it is gone
    assert await inboxes.can_resume(APP, "bob", entries[1].id)
    assert not await inboxes.can_resume(APP, "bob", EventId(entries[2].id.ms + 1, 0))  # never written: no resume


async def _changes(presence: Presence, inboxes: Inboxes, user: str, texts: list[str]) -> list[EventId]:
    """alice's custom texts, each one entry of ``user``'s inbox: their ids, read as each is written."""
    inbox = inboxes.key(APP, user)
    ids = []
    for text in texts:
        await presence.set_custom_status(APP, "alice", 1, text)
        ((newest, _),) = await presence.store.one(inbox, "XREVRANGE", inbox, "+", "-", "COUNT", 1)
        ids.append(EventId.parse(newest))
    return ids


async def test_resume_is_refused_once_maxlen_dropped_an_entry_after_the_cursor(any_redis: Redis) -> None:
    """XADD MAXLEN (and XTRIM) leave XINFO STREAM's max-deleted-entry-id alone: the library records what it
    drops, so more changes than ``inbox_maxlen`` while a device is away cannot read as resumable."""
    presence = Presence(any_redis, Settings(inbox_maxlen=3))
    inboxes = Inboxes(presence.store, presence.keys)
    await presence.add_friend(APP, "alice", "bob")
    cursor = await _online(presence, "bob", "phone")
    entries = await _changes(presence, inboxes, "bob", ["one", "two", "three", "four", "five", "six"])
    kept = await presence.store.one(inboxes.key(APP, "bob"), "XRANGE", inboxes.key(APP, "bob"), "-", "+")
    assert [EventId.parse(i) for i, _ in kept] == entries[-3:]  # the newest maxlen, exactly
    assert not await inboxes.can_resume(APP, "bob", cursor)
    assert not await inboxes.can_resume(APP, "bob", entries[0])
    assert not await inboxes.can_resume(APP, "bob", entries[1])  # "three", after it, was dropped
    assert await inboxes.can_resume(APP, "bob", entries[2])  # everything after "three" is still there
    assert await inboxes.can_resume(APP, "bob", entries[5])


async def test_resume_is_refused_once_the_trim_dropped_an_entry_after_the_cursor(presence: Presence) -> None:
    """presence_inbox_trim drops entries up to another session's cursor: a device that had not received
    them cannot resume; one that had, still can (exactly the entries after its cursor are kept)."""
    inboxes = Inboxes(presence.store, presence.keys)
    await presence.add_friend(APP, "alice", "bob")
    cursor = await _online(presence, "bob", "phone")
    entries = await _changes(presence, inboxes, "bob", ["one", "two", "three", "four"])
    await asyncio.sleep(0.01)  # the entries are now older than a 1 ms window
    await inboxes.trim({inboxes.key(APP, "bob"): entries[1]}, window_ms=1)  # "one" and "two" go
    assert not await inboxes.can_resume(APP, "bob", cursor)
    assert not await inboxes.can_resume(APP, "bob", entries[0])  # "two" is gone
    assert await inboxes.can_resume(APP, "bob", entries[1])
    assert await inboxes.can_resume(APP, "bob", entries[2])
    more = await _changes(presence, inboxes, "bob", ["five"])  # later entries change nothing of that
    assert not await inboxes.can_resume(APP, "bob", entries[0])
    assert await inboxes.can_resume(APP, "bob", entries[1]) and await inboxes.can_resume(APP, "bob", more[0])


async def test_a_missing_inbox_cannot_show_that_nothing_after_the_cursor_was_lost(presence: Presence) -> None:
    """No inbox: never written, or written and then trimmed empty (deleted) or expired. The key cannot tell
    which, so the answer is a re-pull, never a resume that might skip entries."""
    inboxes = Inboxes(presence.store, presence.keys)
    assert not await inboxes.can_resume(APP, "bob", NO_EVENT)
    await presence.add_friend(APP, "alice", "bob")
    cursor = await _online(presence, "bob", "phone")
    entries = await _changes(presence, inboxes, "bob", ["one", "two"])
    await asyncio.sleep(0.01)
    await inboxes.trim({inboxes.key(APP, "bob"): entries[-1]}, window_ms=1)  # emptied: deleted
    assert not await presence.store.one(inboxes.key(APP, "bob"), "EXISTS", inboxes.key(APP, "bob"))
    assert not await inboxes.can_resume(APP, "bob", cursor)
    assert not await inboxes.can_resume(APP, "bob", NO_EVENT)


async def test_an_inbox_trimmed_without_a_record_resumes_only_from_its_first_entry_on(presence: Presence) -> None:
    """An inbox trimmed by a library before 4.1.0 (XADD MAXLEN ~, XTRIM: nothing recorded) is judged by
    what it still holds: only a cursor at or after its first entry is sure to have missed nothing."""
    inboxes = Inboxes(presence.store, presence.keys)
    await presence.add_friend(APP, "alice", "bob")
    cursor = await _online(presence, "bob", "phone")
    entries = await _changes(presence, inboxes, "bob", ["one", "two", "three"])
    inbox = inboxes.key(APP, "bob")
    assert await presence.store.one(inbox, "XTRIM", inbox, "MINID", str(entries[1])) == 1
    assert not await inboxes.can_resume(APP, "bob", cursor)
    assert not await inboxes.can_resume(APP, "bob", entries[0])  # maybe nothing was lost: it cannot tell
    assert await inboxes.can_resume(APP, "bob", entries[1])
    past_all = f"{entries[2].ms}-{entries[2].seq + 1}"
    assert await presence.store.one(inbox, "XTRIM", inbox, "MINID", past_all) == 2  # emptied, the key kept
    assert not await inboxes.can_resume(APP, "bob", entries[2])


async def test_trim_drops_the_entries_up_to_each_cursor_older_than_the_window(presence: Presence) -> None:
    inboxes = Inboxes(presence.store, presence.keys)
    await presence.import_friends(APP, "alice", ["bob", "carol"])
    cursors = {user: await _online(presence, user, "phone") for user in ("bob", "carol")}
    for text in ("one", "two", "three"):
        await presence.set_custom_status(APP, "alice", 1, text)
    reads = dict(await inboxes.read({inboxes.key(APP, u): c for u, c in cursors.items()}))
    bob, carol = reads[inboxes.key(APP, "bob")], reads[inboxes.key(APP, "carol")]
    await inboxes.trim({inboxes.key(APP, "bob"): bob[1].id, inboxes.key(APP, "carol"): carol[2].id}, window_ms=60_000)
    assert len(await presence.store.one(inboxes.key(APP, "bob"), "XRANGE", inboxes.key(APP, "bob"), "-", "+")) == 3
    await asyncio.sleep(0.01)  # the entries are now older than a 1 ms window
    await inboxes.trim({inboxes.key(APP, "bob"): bob[1].id, inboxes.key(APP, "carol"): carol[2].id}, window_ms=1)
    ((_, left),) = await inboxes.read({inboxes.key(APP, "bob"): NO_EVENT})
    assert [e.id for e in left] == [bob[2].id]  # up to the cursor only
    assert not await presence.store.one(inboxes.key(APP, "carol"), "EXISTS", inboxes.key(APP, "carol"))  # emptied


async def _heard(subscription: DoorbellSubscription) -> list[str]:
    """The next thing heard (a subscribe confirmation reads as silence); 2 s at most."""
    async with asyncio.timeout(2):
        while (heard := await subscription.receive(0.5)) is None:
            pass
    return heard


async def test_the_doorbell_subscription_hears_the_librarys_doorbells(presence: Presence) -> None:
    inboxes = Inboxes(presence.store, presence.keys)
    subscription: DoorbellSubscription = inboxes.doorbells("n1")
    await presence.add_friend(APP, "alice", "bob")
    await _online(presence, "bob", "phone", node_id="n1")
    await subscription.open()
    try:
        await presence.set_custom_status(APP, "alice", 1, "ring")
        assert await _heard(subscription) == [inboxes.key(APP, "bob")]
        await subscription.ping(1.0)
        assert await _heard(subscription) == []  # its PONG: heard, names nothing
        await presence.store.client.publish(inboxes.doorbell_channel("n1"), b'["broken')
        assert await _heard(subscription) == []  # logged and skipped: the sweep delivers
        assert await subscription.receive(0.05) is None  # silence
    finally:
        await subscription.close(1.0)


async def test_read_refuses_an_inbox_that_is_not_a_stream(real_redis: Redis) -> None:
    presence = Presence(real_redis)
    inboxes = Inboxes(presence.store, presence.keys)
    await real_redis.set(inboxes.key(APP, "bob"), "not a stream")
    with pytest.raises(PresenceError, match="WRONGTYPE"):  # mapped as every Redis error is
        await inboxes.read({inboxes.key(APP, "bob"): NO_EVENT})


async def test_trim_skips_an_inbox_redis_refuses_and_trims_the_others(presence: Presence) -> None:
    inboxes = Inboxes(presence.store, presence.keys)
    await presence.add_friend(APP, "alice", "bob")
    cursor = await _online(presence, "bob", "phone")
    entries = await _changes(presence, inboxes, "bob", ["one", "two"])
    broken = inboxes.key(APP, "carol")
    await presence.store.one(broken, "SET", broken, "not a stream")
    await asyncio.sleep(0.01)  # the entries are now older than a 1 ms window
    await inboxes.trim({broken: cursor, inboxes.key(APP, "bob"): entries[0]}, window_ms=1)
    ((_, left),) = await inboxes.read({inboxes.key(APP, "bob"): NO_EVENT})
    assert [e.id for e in left] == [entries[1]]
    assert await presence.store.one(broken, "GET", broken) == b"not a stream"
