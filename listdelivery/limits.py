"""Limits shared by every runner on every machine: rates, learned rates, connection slots, quotas.

The SMTP layer asks a store before each transaction; the store answers from
state kept in Redis (when the site runs django-q2 on Redis) or in the
database (the embedded default), never in process memory, so two processes on
one machine or twenty on ten machines share one limit.

Rates use GCRA (the generic cell rate algorithm). Its whole state is one
number per limit, the theoretical arrival time (TAT): the moment by which
every token taken so far is paid back at the rate. Taking ``n`` tokens is
allowed when the TAT is no further ahead of now than the burst allows, and
moves it ``n`` intervals on. So one atomic statement takes ``n`` tokens: a Lua
script in Redis, one conditional UPDATE in the database. We chose it over the
``limits`` package (no Django-database storage) and ``pyrate-limiter`` (its
SQL buckets write a row per message). Over any window of ``w`` seconds GCRA
lets through at most ``w × rate + burst``; the default burst is 2 % of a
second's worth, so no second sees more than 2 % above the rate.

A rate over an hour or a day (``1000/h``, ``50000/d``) is the same smooth
limit, spread over the period. A quota is different: a count per UTC day
that starts again at midnight (:meth:`LimitStore.consume_quota`).

Each limit also remembers what the server told us (AIMD): a "slow down"
reply multiplies the share of the configured rate we use by ``factor``, at
most once per ``hold`` seconds, so a burst of 454 replies to transactions
already in flight halves it once, not ten times; every ``quiet`` seconds
without a slow-down gives back ``increase`` of the configured rate, worked out
lazily the next time the limit is used. A 421 "come back later" stops a
limit for a while (:meth:`LimitStore.throttle_for`).

Connection slots cap the sessions open to one relay across all processes.
A slot has an expiry its holder renews, so the slot of a killed process
frees itself after ``ttl`` seconds.

Clocks: the database store uses each machine's ``time.time()``, so machines
must agree within a few milliseconds (NTP does far better). The Redis store
reads the Redis server's ``TIME`` inside its scripts, so clients' clocks do
not matter. Call the database store outside a transaction: a row it updates
stays locked until the caller's transaction ends, and every other runner
would wait for it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from functools import cache
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import F, QuerySet

from .models import LimitQuota, LimitSlot, LimitState
from .rates import BURST_SHARE, UNITS, Rate, parse_rates  # noqa: F401 (re-exported)

#: Seconds without a slow-down before the learned rate climbs one step.
QUIET_PERIOD = 10.0
#: Share of the configured rate given back at each step.
INCREASE_STEP = 0.1
#: Seconds after a slow-down during which further slow-downs are the same one.
DECREASE_HOLD = 2.0
#: The learned share never goes below this, so a limit always recovers.
LEARNED_FLOOR = 0.05

DAY = UNITS["d"]


@dataclass(frozen=True)
class Slot:
    """A connection slot held by this process until :meth:`LimitStore.release_slot`."""

    key: str
    number: int
    token: str
    holder: str


def utc_day(now: float) -> date:
    return datetime.fromtimestamp(now, dt_timezone.utc).date()


def seconds_until_quota_reopens(now: float | None = None) -> float:
    """Seconds until the next UTC midnight, when every daily quota starts again."""
    now = time.time() if now is None else now
    return DAY - now % DAY


def _moment(seconds: float) -> datetime | None:
    return datetime.fromtimestamp(seconds, dt_timezone.utc) if seconds > 0 else None


class LimitStore:
    """Where shared limits live; :class:`DatabaseStore` and :class:`RedisStore` behave alike."""

    def __init__(
        self,
        *,
        quiet: float = QUIET_PERIOD,
        increase: float = INCREASE_STEP,
        hold: float = DECREASE_HOLD,
    ) -> None:
        self.quiet = quiet
        self.increase = increase
        self.hold = hold

    def take(self, key: str, rate: Rate, n: int = 1, burst: int | None = None) -> float:
        """Take ``n`` tokens of ``key`` at ``rate`` (times the learned share).

        Returns 0.0 when they were taken, or the seconds to wait before they
        can be, having taken nothing. Never sleeps. More than ``burst`` tokens
        at once are allowed only when the limit has nothing outstanding.
        """
        raise NotImplementedError

    def slow_down(self, key: str, factor: float = 0.5, floor: float = LEARNED_FLOOR) -> float:
        """A "slow down" reply: multiply the learned share by ``factor`` (once per ``hold``).

        Returns the learned share now. ``floor`` is the least it goes down to.
        """
        raise NotImplementedError

    @staticmethod
    def _check_slow_down(factor: float, floor: float) -> None:
        if not (0 < factor < 1 and 0 < floor <= 1):
            raise ValueError(
                f"slow_down needs 0 < factor < 1 and 0 < floor <= 1, not {factor} and {floor}"
            )

    def current(self, key: str) -> float:
        """The learned share of the configured rate, 1.0 when nothing was learned."""
        raise NotImplementedError

    def throttle_for(self, key: str, seconds: float) -> None:
        """Take nothing from ``key`` for ``seconds`` (a 421 "come back later")."""
        raise NotImplementedError

    def acquire_slot(self, key: str, limit: int, holder: str, ttl: float) -> Slot | None:
        """One of ``limit`` slots of ``key`` for ``ttl`` seconds, or ``None`` when all are held."""
        raise NotImplementedError

    def renew_slot(self, slot: Slot, ttl: float) -> bool:
        """Keep the slot ``ttl`` seconds more; ``False`` when it expired and someone took it."""
        raise NotImplementedError

    def release_slot(self, slot: Slot) -> None:
        raise NotImplementedError

    def consume_quota(self, key: str, limit: int, n: int = 1) -> int:
        """Use up to ``n`` of today's (UTC) ``limit``; returns how many were granted."""
        raise NotImplementedError

    def snapshot(self, key: str) -> dict[str, Any]:
        """What the dashboard shows of ``key``: rate, learned share, throttle, sessions, quota."""
        raise NotImplementedError

    @staticmethod
    def _describe(
        key: str,
        rate: str,
        learned: float,
        decreased_at: float,
        throttled_until: float,
        now: float,
        sessions: int,
        quota_used: int,
    ) -> dict[str, Any]:
        learned_rate = Rate.parse(rate).per_second * learned if rate else None
        return {
            "key": key,
            "rate": rate,
            "learned": learned,
            "learned_rate": learned_rate,
            "slowed_down_at": _moment(decreased_at),
            "throttled_until": _moment(throttled_until) if throttled_until > now else None,
            "sessions": sessions,
            "quota_used": quota_used,
        }


# The learned share with the quiet periods since its last change given back
# (AIMD's additive increase, worked out when the limit is next used), and
# where its last change then sits. In an UPDATE every right-hand side reads
# the row as it was, so these can appear in several assignments.
SQL_LEARNED = (
    "{least}(1.0, learned + {greatest}(0.0, FLOOR((%(now)s - changed_at) / %(quiet)s))"
    " * %(increase)s)"
)
SQL_CHANGED = "changed_at + {greatest}(0.0, FLOOR((%(now)s - changed_at) / %(quiet)s)) * %(quiet)s"
SQL_TAKE = """
UPDATE {table} SET
    tat = {greatest}(tat, %(now)s) + %(n)s * %(interval)s / {learned},
    learned = {learned}, changed_at = {changed}, rate = %(rate)s
WHERE "key" = %(key)s AND throttled_until <= %(now)s
    AND tat <= %(now)s + %(room)s * %(interval)s / {learned}
"""
SQL_WAIT = """
SELECT {greatest}(tat - %(room)s * %(interval)s / {learned} - %(now)s, throttled_until - %(now)s)
FROM {table} WHERE "key" = %(key)s
"""
SQL_SLOW_DOWN = """
UPDATE {table} SET
    learned = {greatest}(%(floor)s, {learned} * %(factor)s),
    changed_at = %(now)s, decreased_at = %(now)s
WHERE "key" = %(key)s AND decreased_at <= %(now)s - %(hold)s
"""
SQL_THROTTLE = """
UPDATE {table} SET throttled_until = {greatest}(throttled_until, %(until)s) WHERE "key" = %(key)s
"""
SQL_STATE = """
SELECT {learned}, rate, decreased_at, throttled_until FROM {table} WHERE "key" = %(key)s
"""


class DatabaseStore(LimitStore):
    """Limits in the site's database: one row per limit, slot and quota day.

    Each token grant is one conditional UPDATE whose WHERE checks the limit
    and whose SET moves it on, computed by the database from the row's own
    values, so concurrent runners can never both get the last token: SQLite
    serializes writes, PostgreSQL re-checks the WHERE on the locked row.

    The rate statements are SQL text, not ORM expressions: building the
    expressions took 5 ms a call, sixty times the statement itself, on the path
    of every message. The text is the same on SQLite and PostgreSQL but for
    the names of two functions.
    """

    def __init__(self, using: str = "default", **aimd: float) -> None:
        super().__init__(**aimd)
        self.using = using
        self._statements: dict[str, str] = {}

    def _execute(self, template: str, **params: Any) -> tuple[int, tuple | None]:
        """Run a rate statement; the rows it changed and the first row it read."""
        connection = connections[self.using]
        sql = self._statements.get(template)
        if sql is None:
            names = {"greatest": "GREATEST", "least": "LEAST"}
            if connection.vendor == "sqlite":
                names = {"greatest": "MAX", "least": "MIN"}  # MAX(a, b) is SQLite's GREATEST
            names["learned"] = SQL_LEARNED.format(**names)
            names["changed"] = SQL_CHANGED.format(**names)
            table = connection.ops.quote_name(LimitState._meta.db_table)
            sql = self._statements[template] = template.format(table=table, **names)
        params.update(now=time.time(), quiet=self.quiet, increase=self.increase)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            if cursor.description is None:
                return cursor.rowcount, None
            return cursor.rowcount, cursor.fetchone()

    def _create(self, key: str) -> None:
        LimitState.objects.using(self.using).bulk_create(
            [LimitState(key=key)], ignore_conflicts=True
        )

    def take(self, key: str, rate: Rate, n: int = 1, burst: int | None = None) -> float:
        room = max(rate.default_burst() if burst is None else burst, n) - n
        shape = {"key": key, "interval": rate.interval, "room": float(room)}
        while True:
            taken, _ = self._execute(SQL_TAKE, n=float(n), rate=str(rate), **shape)
            if taken:
                return 0.0
            _, found = self._execute(SQL_WAIT, **shape)
            if found is None:
                self._create(key)
            elif found[0] > 0:
                return found[0]
            # else another runner changed the limit between the two statements: try again

    def slow_down(self, key: str, factor: float = 0.5, floor: float = LEARNED_FLOOR) -> float:
        self._check_slow_down(factor, floor)
        self._create(key)
        self._execute(SQL_SLOW_DOWN, key=key, factor=factor, floor=floor, hold=self.hold)
        return self.current(key)

    def current(self, key: str) -> float:
        _, found = self._execute(SQL_STATE, key=key)
        return 1.0 if found is None else found[0]

    def throttle_for(self, key: str, seconds: float) -> None:
        self._create(key)
        self._execute(SQL_THROTTLE, key=key, until=time.time() + seconds)

    def _slots(self, key: str, **fields: Any) -> QuerySet[LimitSlot]:
        return LimitSlot.objects.using(self.using).filter(key=key, **fields)

    def acquire_slot(self, key: str, limit: int, holder: str, ttl: float) -> Slot | None:
        now = time.time()
        expiries = dict(self._slots(key, number__lt=limit).values_list("number", "expires_at"))
        missing = [number for number in range(limit) if number not in expiries]
        if missing:
            LimitSlot.objects.using(self.using).bulk_create(
                [LimitSlot(key=key, number=number) for number in missing], ignore_conflicts=True
            )
            expiries.update(dict.fromkeys(missing, 0.0))
        token = uuid.uuid4().hex
        for number in sorted(n for n, expires_at in expiries.items() if expires_at < now):
            if self._slots(key, number=number, expires_at__lt=now).update(
                holder=holder, token=token, expires_at=now + ttl
            ):
                return Slot(key, number, token, holder)
        return None

    def renew_slot(self, slot: Slot, ttl: float) -> bool:
        held = self._slots(slot.key, number=slot.number, token=slot.token)
        return bool(held.update(expires_at=time.time() + ttl))

    def release_slot(self, slot: Slot) -> None:
        held = self._slots(slot.key, number=slot.number, token=slot.token)
        held.update(holder="", token="", expires_at=0.0)

    def consume_quota(self, key: str, limit: int, n: int = 1) -> int:
        today = utc_day(time.time())
        quotas = LimitQuota.objects.using(self.using)
        row = quotas.filter(key=key, day=today)
        want = min(n, limit)
        while want > 0:
            # The amount is fixed before the UPDATE, so a granted UPDATE tells exactly what we got.
            if row.filter(used__lte=limit - want).update(used=F("used") + want):
                return want
            used = row.values_list("used", flat=True).first()
            if used is None:
                quotas.filter(key=key, day__lt=today - timedelta(days=1)).delete()
                quotas.bulk_create([LimitQuota(key=key, day=today)], ignore_conflicts=True)
            else:
                want = min(n, limit - used)
        return 0

    def snapshot(self, key: str) -> dict[str, Any]:
        now = time.time()
        _, found = self._execute(SQL_STATE, key=key)
        learned, rate, decreased_at, throttled_until = found or (1.0, "", 0.0, 0.0)
        sessions = self._slots(key, expires_at__gte=now).count()
        used = (
            LimitQuota.objects.using(self.using)
            .filter(key=key, day=utc_day(now))
            .values_list("used", flat=True)
            .first()
        )
        return self._describe(
            key, rate, learned, decreased_at, throttled_until, now, sessions, used or 0
        )


# The Redis scripts read the server's clock and the limit's hash, give back
# the quiet periods since the last change (AIMD's additive increase), then act.
LUA_STATE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local quiet, increase = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'tat', 'learned', 'changed_at', 'decreased_at', 'throttled_until')
local tat, learned = tonumber(s[1]) or 0, tonumber(s[2]) or 1
local changed_at, decreased_at = tonumber(s[3]) or 0, tonumber(s[4]) or 0
local throttled_until = tonumber(s[5]) or 0
local steps = math.max(0, math.floor((now - changed_at) / quiet))
learned = math.min(1, learned + steps * increase)
changed_at = changed_at + steps * quiet
local function f(x) return string.format('%.6f', x) end
local function save(...)
  redis.call('HSET', KEYS[1], 'learned', f(learned), 'changed_at', f(changed_at), ...)
  redis.call('EXPIRE', KEYS[1], math.ceil(math.max(tat, throttled_until, now) - now) + 86400)
end
"""
# ARGV 3..: interval, n, room, rate text. Returns the wait as text (Lua floats become integers).
LUA_TAKE = (
    LUA_STATE
    + """
local interval = tonumber(ARGV[3]) / learned
local n, room = tonumber(ARGV[4]), tonumber(ARGV[5])
local wait = math.max(tat - room * interval - now, throttled_until - now)
if wait > 0 then return f(wait) end
tat = math.max(tat, now) + n * interval
save('tat', f(tat), 'rate', ARGV[6])
return '0'
"""
)
# ARGV 3..: factor, floor, hold.
LUA_SLOW_DOWN = (
    LUA_STATE
    + """
if now - decreased_at >= tonumber(ARGV[5]) then
  learned = math.max(tonumber(ARGV[4]), learned * tonumber(ARGV[3]))
  changed_at = now
  save('decreased_at', f(now))
end
return f(learned)
"""
)
LUA_CURRENT = LUA_STATE + "return {f(learned), f(now)}"
# ARGV 3: seconds.
LUA_THROTTLE = (
    LUA_STATE
    + """
throttled_until = math.max(throttled_until, now + tonumber(ARGV[3]))
save('throttled_until', f(throttled_until))
"""
)
# KEYS: the slots' sorted set (score: expiry) and their holders' hash.
LUA_SLOTS = """
local function keep(ttl)  -- the keys outlive every slot in them, then go
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < (ttl + 60) * 1000 then
      redis.call('EXPIRE', key, math.ceil(ttl) + 60)
    end
  end
end
"""
# ARGV: limit, ttl, token|holder. Returns the slot's number, or -1.
LUA_ACQUIRE = (
    LUA_SLOTS
    + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
for _, number in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)) do
  redis.call('ZREM', KEYS[1], number)
  redis.call('HDEL', KEYS[2], number)
end
for number = 0, tonumber(ARGV[1]) - 1 do
  if not redis.call('ZSCORE', KEYS[1], number) then
    redis.call('ZADD', KEYS[1], string.format('%.6f', now + tonumber(ARGV[2])), number)
    redis.call('HSET', KEYS[2], number, ARGV[3])
    keep(tonumber(ARGV[2]))
    return number
  end
end
return -1
"""
)
# ARGV: number, token|holder, ttl (0: release).
LUA_RENEW = (
    LUA_SLOTS
    + """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
local ttl = tonumber(ARGV[3])
if ttl == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('ZADD', KEYS[1], 'XX', string.format('%.6f', now + ttl), ARGV[1])
keep(ttl)
return 1
"""
)
# KEYS: the quota's hash (field: UTC day number). ARGV: limit, n.
LUA_QUOTA = """
local clock = redis.call('TIME')
local today = math.floor(tonumber(clock[1]) / 86400)
local used = tonumber(redis.call('HGET', KEYS[1], today)) or 0
local granted = math.max(0, math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used))
if granted > 0 then
  for _, day in ipairs(redis.call('HKEYS', KEYS[1])) do
    if tonumber(day) < today - 1 then redis.call('HDEL', KEYS[1], day) end
  end
  redis.call('HINCRBY', KEYS[1], today, granted)
  redis.call('EXPIRE', KEYS[1], 2 * 86400)
end
return granted
"""


class RedisStore(LimitStore):
    """Limits in Redis, each operation one Lua script timed by the Redis server's clock."""

    def __init__(
        self,
        connection: Any,
        *,
        prefix: str = "listdelivery:limits:",
        **aimd: float,
    ) -> None:
        import redis  # the "redis" extra: only sites on Redis need it

        super().__init__(**aimd)
        if isinstance(connection, str):
            connection = redis.Redis.from_url(connection)
        elif isinstance(connection, dict):
            connection = redis.Redis(**connection)
        self.redis = connection
        self.prefix = prefix
        self._take = connection.register_script(LUA_TAKE)
        self._slow_down = connection.register_script(LUA_SLOW_DOWN)
        self._current = connection.register_script(LUA_CURRENT)
        self._throttle = connection.register_script(LUA_THROTTLE)
        self._acquire = connection.register_script(LUA_ACQUIRE)
        self._renew = connection.register_script(LUA_RENEW)
        self._quota = connection.register_script(LUA_QUOTA)

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    def _run(self, script: Any, key: str, *args: Any) -> Any:
        return script(keys=[self._key("rate", key)], args=[self.quiet, self.increase, *args])

    def take(self, key: str, rate: Rate, n: int = 1, burst: int | None = None) -> float:
        room = max(rate.default_burst() if burst is None else burst, n) - n
        return float(self._run(self._take, key, rate.interval, n, room, str(rate)))

    def slow_down(self, key: str, factor: float = 0.5, floor: float = LEARNED_FLOOR) -> float:
        self._check_slow_down(factor, floor)
        return float(self._run(self._slow_down, key, factor, floor, self.hold))

    def current(self, key: str) -> float:
        return float(self._run(self._current, key)[0])

    def throttle_for(self, key: str, seconds: float) -> None:
        self._run(self._throttle, key, seconds)

    def _slot_keys(self, key: str) -> list[str]:
        return [self._key("slots", key), self._key("holders", key)]

    def acquire_slot(self, key: str, limit: int, holder: str, ttl: float) -> Slot | None:
        token = uuid.uuid4().hex
        number = self._acquire(keys=self._slot_keys(key), args=[limit, ttl, f"{token}|{holder}"])
        return None if number < 0 else Slot(key, number, token, holder)

    def _renew_or_release(self, slot: Slot, ttl: float) -> bool:
        held = f"{slot.token}|{slot.holder}"
        return bool(self._renew(keys=self._slot_keys(slot.key), args=[slot.number, held, ttl]))

    def renew_slot(self, slot: Slot, ttl: float) -> bool:
        return self._renew_or_release(slot, ttl)

    def release_slot(self, slot: Slot) -> None:
        self._renew_or_release(slot, 0)

    def consume_quota(self, key: str, limit: int, n: int = 1) -> int:
        return int(self._quota(keys=[self._key("quota", key)], args=[limit, n]))

    def snapshot(self, key: str) -> dict[str, Any]:
        learned, now = (float(x) for x in self._run(self._current, key))
        state = {
            name.decode(): value.decode()
            for name, value in self.redis.hgetall(self._key("rate", key)).items()
        }
        sessions = self.redis.zcount(self._key("slots", key), now, "+inf")
        used = self.redis.hget(self._key("quota", key), int(now // DAY))
        return self._describe(
            key,
            state.get("rate", ""),
            learned,
            float(state.get("decreased_at", 0)),
            float(state.get("throttled_until", 0)),
            now,
            sessions,
            int(used or 0),
        )


def store_for(location: str | None = None) -> LimitStore:
    """The store shared limits live in.

    ``location`` is ``"database"``, a ``redis://`` URL, or empty: then Redis
    when django-q2 runs on Redis (``Q_CLUSTER["redis"]``, a URL or a dict of
    connection arguments), the database otherwise. One store per location
    and process, so connections are reused.
    """
    if not location:
        redis = getattr(settings, "Q_CLUSTER", {}).get("redis")
        if isinstance(redis, dict):
            location = json.dumps(redis, sort_keys=True)
        else:
            location = redis or "database"
    return _store_at(location)


@cache
def _store_at(location: str) -> LimitStore:
    if location == "database":
        return DatabaseStore()
    if location.startswith("{"):
        return RedisStore(json.loads(location))
    if location.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(location)
    raise ValueError(
        f"{location!r} is not a place for shared limits: use 'database' or a redis:// URL"
    )
