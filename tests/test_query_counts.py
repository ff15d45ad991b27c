"""Database work per post stays flat: a fixed number of queries per batch, never per recipient."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from listdelivery.models import Member, Personalization

from .conftest import queue_post, run

pytestmark = pytest.mark.django_db


def add_members(mlist, count: int) -> None:
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"m{i:05d}@example.org", display_name=f"M {i}")
        for i in range(count)
    )


def queries_to_deliver(mlist, post) -> int:
    """Statements sent to the database, savepoints of the test's own transaction aside."""
    queue_post(mlist, post)
    with CaptureQueriesContext(connection) as captured:
        run()
    return sum(1 for query in captured.captured_queries if "SAVEPOINT" not in query["sql"].upper())


@pytest.mark.parametrize("personalize", [Personalization.NONE, Personalization.FULL])
def test_ten_times_the_members_costs_one_query_set_per_extra_batch(
    deliver_to, smtpd, mlist, first_post, personalize
):
    deliver_to(CHECKPOINT_EVERY=50, MAX_RECIPIENTS=5)
    mlist.personalize = personalize
    mlist.save()
    small = queries_to_deliver(mlist, first_post)  # 3 members: one batch
    add_members(mlist, 997)
    large = queries_to_deliver(mlist, first_post)  # 1,000 members

    batch = 50 if personalize == Personalization.FULL else 250
    batches = -(-1000 // batch)
    per_batch = 4 if personalize == Personalization.FULL else 3  # page, (names), updates, lease
    assert large <= small + batches * per_batch, f"{small} queries for 3 members, {large} for 1,000"


def claim_statements() -> int:
    """A look at what is due first, the SELECT that locks the posts (where the database locks
    rows; else the first look, when it holds no shard, is that SELECT), the UPDATE, reading the rows."""
    return 4 if connection.features.has_select_for_update_skip_locked else 3


def test_a_small_post_takes_a_handful_of_queries(deliver_to, smtpd, mlist, first_post):
    queries_to_deliver(mlist, first_post)  # the hour's totals and the pass record now exist
    # The claim, the claim's read of recipients; in one transaction the read that locks the
    # posts still ours, an UPDATE of recipients, of the hour's totals and of the post, and the
    # attempts' INSERT; the claim that finds nothing, and the UPDATE saying the pass is over.
    assert queries_to_deliver(mlist, first_post) == claim_statements() + 8
    assert len(smtpd.messages) == 2


def test_the_small_posts_of_a_claim_are_written_together(deliver_to, smtpd, mlist, first_post):
    """Twenty posts: the claim's statements, one read of each post but the first as it
    starts (a discard meanwhile is seen), and the same handful of writes as for one post."""
    queries_to_deliver(mlist, first_post)
    for _ in range(19):
        queue_post(mlist, first_post)
    assert queries_to_deliver(mlist, first_post) == claim_statements() + 8 + 19
    assert len(smtpd.messages) == 21


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's planner, without statistics")
def test_the_statements_of_a_claim_find_its_posts_by_id_however_many_wait(
    deliver_to, smtpd, mlist, first_post
):
    """Without statistics SQLite judged the status index cheaper than twenty ids or more, and
    read every waiting post for each fenced write of a claim: a cost that grew with the queue."""
    deliver_to(CLAIM_BATCH=50)
    for _ in range(120):
        queue_post(mlist, first_post)
    with CaptureQueriesContext(connection) as captured:
        assert run().delivered == 120
    by_ids = [
        query["sql"]
        for query in captured.captured_queries
        if "listdelivery_outgoingmessage" in query["sql"] and '"id" IN (' in query["sql"]
    ]
    assert any(sql.startswith("UPDATE") for sql in by_ids)  # the claim and the books' ending
    assert any(sql.startswith("SELECT") for sql in by_ids)  # which posts are still held
    with connection.cursor() as cursor:
        for sql in by_ids:
            cursor.execute(f"EXPLAIN QUERY PLAN {sql}")
            plan = " ".join(str(step[-1]) for step in cursor.fetchall())
            assert "listdelivery_due" not in plan, (sql, plan)
