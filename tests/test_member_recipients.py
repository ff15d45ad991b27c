"""A list's members as recipients: a set that reads the database, queued a page at a time.

How little memory a big list's enqueue takes is measured by ``python -m bench.million``;
these tests say what a host site and Mailman-style code can rely on.
"""

from __future__ import annotations

import pickle
from collections.abc import Set

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from listdelivery import pipeline
from listdelivery.models import DeliveryStatus, MailingList, Member, OutgoingRecipient
from listdelivery.pipeline import MemberRecipients, member_recipients, to_outgoing

from .conftest import queue_post

pytestmark = pytest.mark.django_db

SEED = {"aperson@example.com", "bperson@example.com", "cperson@example.com"}


def queued(row) -> list[str]:
    return list(row.recipients.order_by("id").values_list("address", flat=True))


def test_the_members_in_msgdata_work_as_mailmans_set_of_addresses(mlist, first_post):
    Member.objects.create(
        mailing_list=mlist, address="dperson@example.com", delivery_status=DeliveryStatus.BY_USER
    )
    msgdata = {}
    member_recipients(mlist, first_post, msgdata)
    recipients = msgdata["recipients"]

    assert isinstance(recipients, Set)
    assert recipients == SEED and SEED == recipients
    assert set(recipients) == SEED and len(recipients) == 3 and recipients
    assert sorted(recipients) == sorted(SEED)
    assert "aperson@example.com" in recipients
    assert "dperson@example.com" not in recipients  # delivery disabled
    assert "APERSON@example.com" not in recipients  # exactly, as in a set of the addresses
    assert recipients - {"aperson@example.com"} == {"bperson@example.com", "cperson@example.com"}
    assert type(recipients | {"x@example.org"}) is set
    assert pickle.loads(pickle.dumps(recipients)) == SEED  # Mailman's switchboard pickles msgdata


def test_the_member_set_reads_the_members_as_they_are_when_used(mlist, first_post):
    msgdata = {}
    member_recipients(mlist, first_post, msgdata)
    Member.objects.create(mailing_list=mlist, address="dperson@example.com")
    Member.objects.filter(address="aperson@example.com").update(
        delivery_status=DeliveryStatus.BY_BOUNCES
    )

    row = to_outgoing(mlist, first_post, msgdata)

    assert queued(row) == ["bperson@example.com", "cperson@example.com", "dperson@example.com"]


def test_a_list_without_enabled_members_is_an_empty_set(db):
    empty = MailingList.objects.create(address="empty@example.com")
    recipients = MemberRecipients(empty)

    assert not recipients and len(recipients) == 0 and recipients == set()


def test_members_are_read_a_page_at_a_time_each_once_in_address_order(
    mlist, first_post, monkeypatch
):
    monkeypatch.setattr(pipeline, "MEMBER_PAGE", 2)
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=address)
        for address in ("zperson@example.com", "dperson@example.com")
    )
    members = Member._meta.db_table

    with CaptureQueriesContext(connection) as queries:
        addresses = list(MemberRecipients(mlist))

    assert addresses == sorted(SEED | {"dperson@example.com", "zperson@example.com"})
    # list() asks len() first, a COUNT; the addresses come in pages of two.
    reads = [q["sql"] for q in queries.captured_queries if members in q["sql"]]
    pages = [sql for sql in reads if "COUNT(" not in sql]
    assert len(pages) == 3 and all(sql.endswith("LIMIT 2") for sql in pages)


def test_a_big_list_is_queued_page_by_page_each_member_once(mlist, first_post, monkeypatch):
    monkeypatch.setattr(pipeline, "MEMBER_PAGE", 7)
    monkeypatch.setattr(pipeline, "INSERT_BATCH", 5)
    others = [f"member{i:02d}@example.org" for i in range(40)]
    Member.objects.bulk_create(Member(mailing_list=mlist, address=a) for a in others)

    row = queue_post(mlist, first_post)

    assert queued(row) == sorted(SEED) + others
    assert (row.recipient_count, row.failed_count) == (43, 0)


def test_a_member_address_that_cannot_be_used_is_recorded_as_failed(mlist, first_post):
    Member.objects.create(mailing_list=mlist, address="nodomain")

    row = queue_post(mlist, first_post)

    failed = row.recipients.get(status=OutgoingRecipient.Status.FAILED)
    assert (failed.address, failed.smtp_message) == (
        "nodomain",
        "invalid address: it has no domain",
    )
    assert failed.finished_at is not None and failed.finished_at <= timezone.now()
    assert (row.recipient_count, row.failed_count) == (4, 1)
    assert set(queued(row)) == SEED | {"nodomain"}


@pytest.mark.parametrize(
    "spellings",
    [
        ("Ärger@example.com", "ärger@example.com"),  # SQLite's lower() leaves Ä as it is
        ("Straße@example.com", "strasse@example.com"),  # the ASCII spelling comes second
        ("strasse@example.com", "straße@example.com"),  # … and first
    ],
)
def test_members_whose_addresses_differ_only_in_case_get_one_copy(mlist, first_post, spellings):
    try:
        with transaction.atomic():
            Member.objects.bulk_create(Member(mailing_list=mlist, address=a) for a in spellings)
    except IntegrityError:
        pytest.skip("this database keeps these spellings apart itself")

    row = queue_post(mlist, first_post)

    extra = [address for address in queued(row) if address not in SEED]
    assert len(extra) == 1 and extra[0] in spellings


def test_the_enqueue_writes_every_column_of_a_recipient_row():
    """It INSERTs the rows itself (bulk_create was five times slower): a column added to
    the model must be added to what it writes."""
    columns = {f.column for f in OutgoingRecipient._meta.concrete_fields if not f.primary_key}
    assert columns == set(pipeline.RECIPIENT_COLUMNS)
