"""Shared limits, against the database and against Redis: rates, learned rates, slots, quotas.

Real time in short spans, real stores, and real processes where the claim is
that every runner shares one limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from listdelivery.limits import (
    DatabaseStore,
    LimitStore,
    Rate,
    RedisStore,
    parse_rates,
    seconds_until_quota_reopens,
    store_for,
)

from .conftest import ROOT, database_url

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_or_skip():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis is not reachable at {REDIS_URL} ({error}); set REDIS_URL")
    return client


# Transactional: worker processes must see what the test writes, and the other way round.
@pytest.fixture(
    params=[pytest.param("database", marks=pytest.mark.django_db(transaction=True)), "redis"]
)
def store(request):
    if request.param == "database":
        yield DatabaseStore()
        return
    client = redis_or_skip()
    prefix = f"test-limits-{uuid.uuid4().hex}:"
    yield RedisStore(client, prefix=prefix)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def same_kind(store: LimitStore, **aimd: float) -> LimitStore:
    """A store on the same state as ``store``: what another process, or a restart, would build."""
    if isinstance(store, RedisStore):
        return RedisStore(store.redis, prefix=store.prefix, **aimd)
    return DatabaseStore(**aimd)


def take_for(store: LimitStore, key: str, rate: Rate, seconds: float) -> int:
    """Take one token at a time for ``seconds``, waiting as told; how many were granted."""
    granted, end = 0, time.time() + seconds
    while (now := time.time()) < end:
        wait = store.take(key, rate)
        if wait == 0:
            granted += 1
        else:
            time.sleep(min(wait, end - now))
    return granted


# --- Reading rates -------------------------------------------------------------------------


def test_rates_are_read_as_a_count_per_second_minute_hour_or_day():
    assert Rate.parse("14/s") == Rate(14, 1.0)
    assert Rate.parse("1000/h") == Rate(1000, 3600.0)
    assert Rate.parse(" 50000 / day ") == Rate(50000, 86400.0)
    assert Rate.parse("100/10s") == Rate(100, 10.0)
    assert Rate.parse("14/s").interval == pytest.approx(1 / 14)
    assert [str(rate) for rate in parse_rates("14/s, 50000/d")] == ["14/s", "50000/d"]
    assert parse_rates(["1000/h"]) == [Rate(1000, 3600.0)]
    assert parse_rates("") == []


@pytest.mark.parametrize("text", ["", "fast", "14", "14/w", "1.5/s", "-3/s"])
def test_a_rate_that_is_not_a_count_per_unit_is_refused_with_an_example(text):
    with pytest.raises(ValueError, match="such as 14/s, 1000/h or 50000/d"):
        Rate.parse(text)


def test_a_rate_of_nothing_is_refused():
    with pytest.raises(ValueError, match="allows nothing"):
        Rate.parse("0/s")


def test_the_default_burst_keeps_any_second_within_a_few_percent_of_the_rate():
    assert Rate.parse("200/s").default_burst() == 4  # at most 204 in any second
    assert Rate.parse("14/s").default_burst() == 1
    assert Rate.parse("50000/d").default_burst() == 1


# --- Rates: GCRA -----------------------------------------------------------------------------


def test_200_per_second_for_half_a_second_grants_about_a_hundred(store):
    rate = Rate.parse("200/s")
    granted = take_for(store, "relay:sink", rate, 0.5)
    # Never more than the rate and the burst; the least allows for a busy machine.
    assert 60 <= granted <= 100 + rate.default_burst() + 1, granted


def waits_about(wait: float, expected: float, since: float) -> bool:
    """``wait`` is ``expected`` less the time gone by ``since`` then (a busy machine is slow)."""
    return expected - (time.time() - since) <= wait <= expected + 1e-6


def test_a_refused_take_takes_nothing_and_says_how_long_to_wait(store):
    rate = Rate.parse("4/s")
    began = time.time()
    assert store.take("relay:slow", rate, burst=1) == 0.0
    first = store.take("relay:slow", rate, burst=1)
    second = store.take("relay:slow", rate, burst=1)
    assert waits_about(first, 0.25, began)
    assert waits_about(second, 0.25, began) and second <= first, "a refusal took a token"


def test_more_than_the_burst_at_once_goes_only_when_nothing_is_outstanding(store):
    rate = Rate.parse("100/s")
    began = time.time()
    assert store.take("relay:batch", rate, n=10, burst=2) == 0.0
    assert waits_about(store.take("relay:batch", rate, n=1, burst=2), 0.09, began)
    ten = store.take("relay:batch", rate, n=10, burst=2)
    assert waits_about(ten, 0.1, began), "ten at once wait until all ten before are paid back"


def test_a_421_stops_the_limit_for_the_time_asked(store):
    rate = Rate.parse("100/s")
    began = time.time()
    store.throttle_for("relay:busy", 0.3)
    assert waits_about(store.take("relay:busy", rate), 0.3, began)
    store.throttle_for("relay:busy", 0.1)  # a shorter one does not cut the first short
    wait = store.take("relay:busy", rate)
    assert waits_about(wait, 0.3, began)
    time.sleep(wait + 0.01)
    assert store.take("relay:busy", rate) == 0.0


# --- Learned rates: AIMD ---------------------------------------------------------------------


def test_a_burst_of_slow_down_replies_halves_the_rate_once_and_quiet_brings_it_back(store):
    store = same_kind(store, quiet=0.3, increase=0.25, hold=1.0)
    rate = Rate.parse("100/s")
    assert store.current("relay:ses") == 1.0

    for _ in range(10):  # ten 454 replies to transactions that were already in flight
        store.slow_down("relay:ses")
    slowed = time.time()
    assert store.current("relay:ses") == 0.5

    store.take("relay:ses", rate, burst=1)
    assert waits_about(store.take("relay:ses", rate, burst=1), 0.02, slowed), "not half the rate"

    time.sleep(max(0.0, 0.3 - (time.time() - slowed) + 0.01))  # a loaded machine may be past
    assert store.current("relay:ses") == 0.75
    time.sleep(0.3)
    assert store.current("relay:ses") == 1.0


def test_a_slow_down_after_the_hold_lowers_again_but_never_below_the_floor(store):
    store = same_kind(store, hold=0.05)
    assert store.slow_down("relay:ses", factor=0.5, floor=0.2) == 0.5
    time.sleep(0.06)
    assert store.slow_down("relay:ses", factor=0.5, floor=0.2) == 0.25
    time.sleep(0.06)
    assert store.slow_down("relay:ses", factor=0.5, floor=0.2) == 0.2
    with pytest.raises(ValueError, match="0 < floor"):
        store.slow_down("relay:ses", floor=0)


# --- Connection slots ------------------------------------------------------------------------


def test_connection_slots_cap_sessions_and_free_when_released_or_expired(store):
    first = store.acquire_slot("relay:ses", 2, "runner a", ttl=0.3)
    second = store.acquire_slot("relay:ses", 2, "runner b", ttl=10)
    assert (first.number, second.number) == (0, 1)
    assert store.acquire_slot("relay:ses", 2, "runner c", ttl=10) is None

    store.release_slot(second)
    third = store.acquire_slot("relay:ses", 2, "runner c", ttl=10)
    assert third is not None and third.number == 1

    assert store.renew_slot(first, ttl=0.2)
    time.sleep(0.25)  # runner a stopped renewing
    fourth = store.acquire_slot("relay:ses", 2, "runner d", ttl=10)
    assert fourth is not None and fourth.number == 0
    assert not store.renew_slot(first, ttl=10), "a slot someone else took was renewed"
    store.release_slot(first)  # too late: releases nothing
    assert store.snapshot("relay:ses")["sessions"] == 2


# --- Daily quotas ----------------------------------------------------------------------------


def test_a_daily_quota_grants_what_is_left_of_the_day(store):
    assert store.consume_quota("relay:gmail", 10, 6) == 6
    assert same_kind(store).consume_quota("relay:gmail", 10, 6) == 4
    assert store.consume_quota("relay:gmail", 10, 1) == 0
    assert store.consume_quota("relay:other", 10, 1) == 1
    assert 0 < seconds_until_quota_reopens() <= 86400
    assert seconds_until_quota_reopens(86400 * 20000 + 3600) == 82800


# --- What the dashboard reads ----------------------------------------------------------------


def test_a_snapshot_shows_rate_learned_rate_throttle_sessions_and_quota(store):
    assert store.snapshot("relay:ses") == {
        "key": "relay:ses",
        "rate": "",
        "learned": 1.0,
        "learned_rate": None,
        "slowed_down_at": None,
        "throttled_until": None,
        "sessions": 0,
        "quota_used": 0,
    }
    store.take("relay:ses", Rate.parse("14/s"))
    store.slow_down("relay:ses")
    store.throttle_for("relay:ses", 60)
    store.acquire_slot("relay:ses", 3, "runner a", ttl=60)
    store.consume_quota("relay:ses", 1000, 7)

    shown = store.snapshot("relay:ses")
    assert shown["rate"] == "14/s"
    assert shown["learned"] == 0.5
    assert shown["learned_rate"] == 7.0
    assert shown["slowed_down_at"] is not None
    assert 59 < (shown["throttled_until"] - shown["slowed_down_at"]).total_seconds() <= 60.1
    assert (shown["sessions"], shown["quota_used"]) == (1, 7)


# --- Where limits live -----------------------------------------------------------------------


def test_limits_live_in_redis_when_django_q_does_and_in_the_database_otherwise(settings):
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "redis": REDIS_URL}
    assert isinstance(store_for(), RedisStore)
    settings.Q_CLUSTER = {k: v for k, v in settings.Q_CLUSTER.items() if k != "redis"}
    assert isinstance(store_for(), DatabaseStore)
    assert store_for("database") is store_for("database")
    with pytest.raises(ValueError, match="use 'database' or a redis:// URL"):
        store_for("memcached://localhost")


# --- Real processes --------------------------------------------------------------------------

WORKER = """
import json, os, sys, time
import django
django.setup()
from listdelivery.limits import DatabaseStore, Rate, RedisStore
job = json.loads(sys.argv[1])
store = DatabaseStore() if job["store"] == "database" else RedisStore(job["store"], prefix=job["prefix"])
if job["do"] == "take":
    rate, granted = Rate.parse(job["rate"]), 0
    print("ready", flush=True)
    sys.stdin.readline()  # go: every worker starts at once
    end = time.time() + job["seconds"]
    while (now := time.time()) < end:
        wait = store.take(job["key"], rate)
        if wait == 0:
            granted += 1
        else:
            time.sleep(min(wait, end - now))
    print(granted)
elif job["do"] == "hold slot":
    slot = store.acquire_slot(job["key"], job["limit"], f"pid {os.getpid()}", job["ttl"])
    print(json.dumps(slot and slot.number), flush=True)
    while slot and store.renew_slot(slot, job["ttl"]):  # as a live SMTP session does
        time.sleep(job["ttl"] / 4)
elif job["do"] == "quota":
    print(store.consume_quota(job["key"], job["limit"], job["n"]))
"""


def worker(store: LimitStore, **job) -> subprocess.Popen:
    """A process of its own, configured like a runner, acting on the same limits as ``store``."""
    if isinstance(store, RedisStore):
        job.update(store=REDIS_URL, prefix=store.prefix)
    else:
        job.update(store="database")
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": database_url(),
    }
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(job)],
        cwd=ROOT,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def output(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    return stdout


@pytest.mark.slow
@pytest.mark.numbers  # with the shaping figures: .ci/run, not make test
def test_two_processes_taking_from_one_limit_never_exceed_its_rate_together(store):
    rate, seconds = Rate.parse("100/s"), 0.5
    processes = [
        worker(store, do="take", key="relay:shared", rate="100/s", seconds=seconds)
        for _ in range(2)
    ]
    for process in processes:
        assert process.stdout.readline() == "ready\n", process.communicate()[1]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    counts = [int(output(process)) for process in processes]

    # GCRA: at most rate × time + burst; one more for the moment between the two goes.
    assert sum(counts) <= seconds * rate.per_second + rate.default_burst() + 2, counts
    assert sum(counts) >= 0.8 * seconds * rate.per_second, counts
    assert min(counts) > 0, "one process got nothing"


@pytest.mark.slow
@pytest.mark.numbers  # with the shaping figures: .ci/run, not make test
def test_slots_cap_sessions_across_processes_and_a_killed_holders_slot_frees_after_its_ttl(
    store,
):
    ttl = 0.6  # renewed every 0.15 s: a busy machine does not make it expire
    holders = [worker(store, do="hold slot", key="relay:anvil", limit=2, ttl=ttl) for _ in range(2)]
    try:
        numbers = sorted(json.loads(holder.stdout.readline()) for holder in holders)
        assert numbers == [0, 1]
        assert store.acquire_slot("relay:anvil", 2, "this process", ttl=10) is None

        os.kill(holders[0].pid, signal.SIGKILL)
        holders[0].wait()
        time.sleep(ttl + 0.05)
        assert store.acquire_slot("relay:anvil", 2, "this process", ttl=10) is not None
        assert store.acquire_slot("relay:anvil", 2, "this process", ttl=10) is None
    finally:
        for holder in holders:
            holder.kill()
            holder.communicate()


@pytest.mark.slow
@pytest.mark.numbers  # with the shaping figures: .ci/run, not make test
def test_a_daily_quota_holds_across_a_restart_of_every_process(store):
    assert output(worker(store, do="quota", key="relay:daily", limit=1000, n=600)) == "600\n"
    restarted = same_kind(store)  # a new process after the first one ended
    assert restarted.consume_quota("relay:daily", 1000, 600) == 400
    assert restarted.snapshot("relay:daily")["quota_used"] == 1000
