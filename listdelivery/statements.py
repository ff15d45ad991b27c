"""The statements of every batch, their SQL built once.

The ORM builds a query anew on every call: for these, run once per batch of
a big post (its page of recipients, their members, the checkpoint) and once
per claim of small posts, building took longer than the database took to
run them. Each is the statement the ORM would write, with its values
prepared by the model fields as the ORM prepares them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from django.db import connection
from django.db.models import Model

from .models import DeliveryHour, Member, OutgoingMessage, OutgoingRecipient

SENT = OutgoingRecipient.Status.SENT
SENDING = OutgoingMessage.Status.SENDING


def mark_sent(ids: Sequence[int], now: datetime) -> int:
    """Recipients ``ids`` accepted, unless already so; how many changed."""
    if not ids:
        return 0
    sql = _mark_sent_sql(len(ids), connection.vendor)
    return _execute(sql, [SENT, _value(OutgoingRecipient, "finished_at", now), *ids, SENT])


def add_to_hour(hour: datetime, list_id: str, sent: int, bounced: int, failed: int) -> int:
    """Add to an hour's totals; 0 if its row is not there yet."""
    sql = _add_to_hour_sql(connection.vendor)
    return _execute(sql, [sent, bounced, failed, _value(DeliveryHour, "hour", hour), list_id])


def held_of(leases: dict[str, list[int]], lock: bool = False) -> set[int]:
    """The posts still held of ``leases`` (token: post ids); with ``lock``, locked until the
    transaction ends where the database can."""
    tokens = tuple(len(ids) for ids in leases.values())
    sql = _held_sql(tokens, lock and connection.features.has_select_for_update, connection.vendor)
    return {pk for (pk,) in _fetch(sql, _fence_params(leases))}


def update_fenced(leases: dict[str, list[int]], fields: dict[str, Any]) -> int:
    """``fields`` (plain values) on the posts of ``leases`` (token: post ids) still held; rows
    changed."""
    names = tuple(fields)
    tokens = tuple(len(ids) for ids in leases.values())
    sql = _fenced_sql(names, tokens, connection.vendor)
    values = [_value(OutgoingMessage, name, fields[name]) for name in names]
    return _execute(sql, [*values, *_fence_params(leases)])


def take(ids: Sequence[int], token: str, now: datetime, until: datetime) -> int:
    """Lease the posts ``ids`` to ``token`` until ``until``, those still free and due at ``now``
    (another runner may have taken some since they were read); rows taken."""
    sql = _take_sql(len(ids), connection.vendor)
    now_value = _value(OutgoingMessage, "sending_since", now)
    params = [token, _value(OutgoingMessage, "leased_until", until), SENDING, now_value]
    params += [*ids, now_value, *OutgoingMessage.WAITING, now_value]
    return _execute(sql, params)


def _fence_params(leases: dict[str, list[int]]) -> list[Any]:
    params: list[Any] = [value for token, ids in leases.items() for value in (*ids, token)]
    return params + list(OutgoingMessage.WAITING)


def add_to_post(pk: int, increments: dict[str, float], fields: dict[str, Any]) -> int:
    """Add ``increments`` to post ``pk``'s counters (``rate`` from NULL as 0), and set ``fields``."""
    added, names = tuple(increments), tuple(fields)
    sql = _add_to_post_sql(added, names, connection.vendor)
    values = [_value(OutgoingMessage, name, fields[name]) for name in names]
    return _execute(sql, [*(increments[name] for name in added), *values, pk])


def _execute(sql: str, params: list[Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _value(model: type[Model], name: str, value: Any) -> Any:
    return model._meta.get_field(name).get_db_prep_save(value, connection)


def _table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _columns(model: type[Model], names: Iterable[str]) -> list[str]:
    quote = connection.ops.quote_name
    return [quote(model._meta.get_field(name).column) for name in names]


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


# The vendor is part of each key: quoting differs between databases.


@lru_cache(maxsize=64)
def _mark_sent_sql(count: int, vendor: str) -> str:
    status, code, text, finished = _columns(
        OutgoingRecipient, ("status", "smtp_code", "smtp_message", "finished_at")
    )
    return (
        f"UPDATE {_table(OutgoingRecipient)} SET {status} = %s, {code} = NULL, {text} = '', "
        f"{finished} = %s WHERE {_columns(OutgoingRecipient, ['id'])[0]} IN "
        f"({_placeholders(count)}) AND NOT ({status} = %s)"
    )


@lru_cache(maxsize=4)
def _add_to_hour_sql(vendor: str) -> str:
    sent, bounced, failed, hour, list_id = _columns(
        DeliveryHour, ("sent", "bounced", "failed", "hour", "list_id")
    )
    return (
        f"UPDATE {_table(DeliveryHour)} SET {sent} = {sent} + %s, "
        f"{bounced} = {bounced} + %s, {failed} = {failed} + %s "
        f"WHERE {hour} = %s AND {list_id} = %s"
    )


def _not_by_index(column: str, vendor: str) -> str:
    """``column`` in a condition SQLite must not search an index by (a unary +, its documented
    way). For rows already known by id: estimating without statistics, SQLite would otherwise
    read every waiting post through the status index rather than look the few up by id."""
    return f"+{column}" if vendor == "sqlite" else column


def _fenced(tokens: tuple[int, ...], vendor: str) -> str:
    """The WHERE clause of posts still held (:meth:`Lease.fenced`'s, which writes with
    expressions): ``tokens`` gives how many post ids each lease has."""
    pk, token, status = _columns(OutgoingMessage, ("id", "lease_token", "status"))
    leases = " OR ".join(f"({pk} IN ({_placeholders(count)}) AND {token} = %s)" for count in tokens)
    waiting = _placeholders(len(OutgoingMessage.WAITING))
    return f"WHERE ({leases or '1 = 0'}) AND {_not_by_index(status, vendor)} IN ({waiting})"


@lru_cache(maxsize=64)
def _held_sql(tokens: tuple[int, ...], lock: bool, vendor: str) -> str:
    pk = _columns(OutgoingMessage, ["id"])[0]
    sql = f"SELECT {pk} FROM {_table(OutgoingMessage)} {_fenced(tokens, vendor)}"
    return sql + " FOR UPDATE" if lock else sql


@lru_cache(maxsize=64)
def _fenced_sql(names: tuple[str, ...], tokens: tuple[int, ...], vendor: str) -> str:
    assignments = ", ".join(f"{column} = %s" for column in _columns(OutgoingMessage, names))
    return f"UPDATE {_table(OutgoingMessage)} SET {assignments} {_fenced(tokens, vendor)}"


@lru_cache(maxsize=64)
def _take_sql(count: int, vendor: str) -> str:
    pk, token, until, attempts, status, since, rate, estimate, shards, due = _columns(
        OutgoingMessage,
        (
            "id",
            "lease_token",
            "leased_until",
            "attempts",
            "status",
            "sending_since",
            "rate",
            "finish_estimate",
            "shard_count",
            "next_attempt_at",
        ),
    )
    return (
        f"UPDATE {_table(OutgoingMessage)} SET {token} = %s, {until} = %s, "
        f"{attempts} = {attempts} + 1, {status} = %s, {since} = %s, {rate} = NULL, "
        f"{estimate} = NULL WHERE {pk} IN ({_placeholders(count)}) AND {shards} = 0 "
        f"AND ({until} IS NULL OR {until} < %s) "
        f"AND {_not_by_index(status, vendor)} IN ({_placeholders(len(OutgoingMessage.WAITING))}) "
        f"AND {due} <= %s"
    )


@lru_cache(maxsize=64)
def _add_to_post_sql(added: tuple[str, ...], names: tuple[str, ...], vendor: str) -> str:
    increments = [
        f"{column} = COALESCE({column}, 0) + %s" for column in _columns(OutgoingMessage, added)
    ]
    assignments = [f"{column} = %s" for column in _columns(OutgoingMessage, names)]
    pk = _columns(OutgoingMessage, ["id"])[0]
    return (
        f"UPDATE {_table(OutgoingMessage)} SET {', '.join(increments + assignments)} "
        f"WHERE {pk} = %s"
    )


def open_recipients(row: OutgoingMessage, after: int, limit: int | None) -> list[tuple[Any, ...]]:
    """``(id, address, status)`` of ``row``'s open recipients past id ``after``, in id order:
    :meth:`OutgoingMessage.recipient_rows` filtered, one page."""
    shard = row.parent_id is not None
    sql = _open_recipients_sql(shard, limit is not None, connection.vendor)
    params: list[Any] = [row.parent_id if shard else row.pk]
    if shard:
        params += [row.first_recipient, row.last_recipient]
    params += [*OutgoingRecipient.OPEN, after]
    if limit is not None:
        params.append(limit)
    return _fetch(sql, params)


def members(list_pk: int, addresses: Sequence[str]) -> list[tuple[Any, ...]]:
    """``(address, display_name, id)`` of the list's members with exactly these addresses."""
    if not addresses:
        return []
    sql = _members_sql(len(addresses), connection.vendor)
    return _fetch(sql, [list_pk, *addresses])


def _fetch(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@lru_cache(maxsize=8)
def _open_recipients_sql(shard: bool, limited: bool, vendor: str) -> str:
    pk, message, address, status = _columns(
        OutgoingRecipient, ("id", "message", "address", "status")
    )
    where = [f"{message} = %s"]
    if shard:
        where += [f"{pk} >= %s", f"{pk} <= %s"]
    where += [f"{status} IN ({_placeholders(len(OutgoingRecipient.OPEN))})", f"{pk} > %s"]
    sql = (
        f"SELECT {pk}, {address}, {status} FROM {_table(OutgoingRecipient)} "
        f"WHERE {' AND '.join(where)} ORDER BY {pk}"
    )
    return sql + " LIMIT %s" if limited else sql


@lru_cache(maxsize=64)
def _members_sql(count: int, vendor: str) -> str:
    address, name, pk, mlist = _columns(Member, ("address", "display_name", "id", "mailing_list"))
    return (
        f"SELECT {address}, {name}, {pk} FROM {_table(Member)} "
        f"WHERE {mlist} = %s AND {address} IN ({_placeholders(count)})"
    )


def insert(objects: Sequence[Model]) -> None:
    """INSERT ``objects`` (of one model, with an automatic primary key) in one executemany;
    their primary keys are not read back."""
    if not objects:
        return
    model = type(objects[0])
    fields = _insert_fields(model)
    rows = [
        [field.get_db_prep_save(field.pre_save(obj, True), connection) for field in fields]
        for obj in objects
    ]
    with connection.cursor() as cursor:
        cursor.executemany(_insert_sql(model, connection.vendor), rows)


def _insert_fields(model: type[Model]) -> list[Any]:
    return [field for field in model._meta.concrete_fields if not field.primary_key]


@lru_cache(maxsize=8)
def _insert_sql(model: type[Model], vendor: str) -> str:
    fields = _insert_fields(model)
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    return f"INSERT INTO {_table(model)} ({columns}) VALUES ({_placeholders(len(fields))})"
