"""Bulk and individual delivery as the SMTP server sees it."""

from __future__ import annotations

from email import message_from_bytes, message_from_string

import pytest

from listdelivery.delivery.bulk import chunkify
from listdelivery.models import DeliveryStatus, Member, OutgoingMessage, Personalization
from listdelivery.pipeline import member_recipients, to_outgoing

from .conftest import FIRST_POST, queue_post, run

pytestmark = pytest.mark.django_db

# Mailman's mta/docs/bulk.rst example: 17 addresses over several top-level domains.
MIXED_DOMAINS = [
    "aperson@example.com",
    "bperson@example.com",
    "cperson@example.com",
    "dperson@example.com",
    "eperson@example.com",
    "fperson@example.net",
    "gperson@example.net",
    "hperson@example.net",
    "iperson@example.net",
    "jperson@example.org",
    "kperson@example.org",
    "lperson@example.org",
    "mperson@example.edu",
    "nperson@example.us",
    "operson@example.ca",
    "pperson@example.xx",
    "qperson@example.zz",
]


def test_chunking_follows_mailmans_domain_groups():
    chunks = chunkify(MIXED_DOMAINS, 4)

    assert [len(c) for c in chunks] == [4, 3, 4, 1, 3, 2]
    assert chunks[0] == [
        "fperson@example.net",
        "gperson@example.net",
        "hperson@example.net",
        "iperson@example.net",
    ]
    assert chunks[-1] == ["pperson@example.xx", "qperson@example.zz"]


def test_chunking_of_52_addresses_at_one_domain_by_4_gives_13_chunks():
    addresses = [f"person{i:02d}@example.com" for i in range(52)]
    assert len(chunkify(addresses, 4)) == 13


def test_unlimited_max_recipients_sends_one_transaction():
    assert chunkify(MIXED_DOMAINS + MIXED_DOMAINS[:3], 0) == [sorted(MIXED_DOMAINS)]


def test_seventeen_mixed_domain_recipients_with_max_4_take_six_transactions(
    deliver_to, smtpd, mlist, first_post
):
    deliver_to(MAX_RECIPIENTS=4)
    queue_post(mlist, first_post, {"recipients": set(MIXED_DOMAINS)})

    summary = run()

    assert summary.transactions == 6
    assert len(smtpd.messages) == 6
    for received in smtpd.messages:
        assert received.rcpt_tos == sorted(received.rcpt_tos)
        assert len(received.rcpt_tos) <= 4
    assert sorted(smtpd.recipients_count()) == sorted(MIXED_DOMAINS)
    assert set(smtpd.recipients_count().values()) == {1}


def test_max_sessions_per_connection_reopens_the_connection(deliver_to, smtpd, mlist, first_post):
    deliver_to(MAX_RECIPIENTS=1, MAX_SESSIONS_PER_CONNECTION=2)
    queue_post(mlist, first_post, {"recipients": {f"m{i}@example.com" for i in range(5)}})

    run()

    assert len(smtpd.messages) == 5
    assert smtpd.connections == 3
    assert [m.connection for m in smtpd.messages] == [1, 1, 2, 2, 3]


def test_one_connection_serves_every_post_of_a_run(deliver_to, smtpd, mlist, first_post):
    for _ in range(5):
        queue_post(mlist, first_post)

    run()

    assert len(smtpd.messages) == 5
    assert smtpd.connections == 1


def test_full_personalization_addresses_each_copy_to_the_member(
    deliver_to, smtpd, mlist, first_post
):
    mlist.personalize = Personalization.FULL
    mlist.save()
    Member.objects.create(
        mailing_list=mlist, address="jm@example.org", display_name="Jürgen Müller"
    )
    Member.objects.create(mailing_list=mlist, address="noname@example.org")

    queue_post(mlist, first_post)
    run()

    to_by_recipient = {m.rcpt_tos[0]: m.message["To"] for m in smtpd.messages}
    assert to_by_recipient == {
        "aperson@example.com": "Anne Person <aperson@example.com>",
        "bperson@example.com": "Bart Person <bperson@example.com>",
        "cperson@example.com": "Cris Person <cperson@example.com>",
        "jm@example.org": "=?utf-8?b?SsO8cmdlbiBNw7xsbGVy?= <jm@example.org>",
        "noname@example.org": "noname@example.org",
    }
    for received in smtpd.messages:
        assert received.message.get_all("To") == [to_by_recipient[received.rcpt_tos[0]]]
        assert received.message["Subject"] == "My first post"
        assert received.message.get_payload() == "First post!\n"


def test_full_personalization_adds_a_to_header_when_the_post_has_none(deliver_to, smtpd, mlist):
    mlist.personalize = Personalization.FULL
    mlist.save()
    msg = message_from_string("From: aperson@example.com\nSubject: no To\n\nBody\n")

    queue_post(mlist, msg)
    run()

    assert sorted(m.message["To"] for m in smtpd.messages) == [
        "Anne Person <aperson@example.com>",
        "Bart Person <bperson@example.com>",
        "Cris Person <cperson@example.com>",
    ]
    assert all(m.message.get_payload() == "Body\n" for m in smtpd.messages)


def test_individual_personalization_leaves_the_headers_alone(deliver_to, smtpd, mlist, first_post):
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()

    queue_post(mlist, first_post)
    run()

    assert len(smtpd.messages) == 3
    assert {m.message["To"] for m in smtpd.messages} == {"test@example.com"}


def test_a_sender_in_the_metadata_overrides_the_bounces_address(
    deliver_to, smtpd, mlist, first_post
):
    queue_post(mlist, first_post, sender="owner@other.example.org")
    run()

    assert smtpd.messages[0].mail_from == "owner@other.example.org"


def test_a_sender_override_is_verped_too(deliver_to, smtpd, mlist, first_post):
    queue_post(
        mlist,
        first_post,
        {"recipients": ["aaa@example.com"]},
        sender="owner@other.example.org",
        verp=True,
    )
    run()

    assert smtpd.messages[0].mail_from == "owner+aaa=example.com@other.example.org"


def test_a_custom_verp_format_is_honoured(deliver_to, smtpd, mlist, first_post):
    deliver_to(VERP_FORMAT="${bounces}-${local}-at-${domain}")
    queue_post(mlist, first_post, {"recipients": ["aaa@example.com"]}, verp=True)
    run()

    assert smtpd.messages[0].mail_from == "test-bounces-aaa-at-example.com@example.com"


@pytest.mark.parametrize("recipients", [set(), [], None])
def test_a_post_without_recipients_sends_nothing_and_says_why(
    deliver_to, smtpd, mlist, first_post, recipients
):
    row = to_outgoing(mlist, first_post, {"recipients": recipients})

    summary = run()

    assert smtpd.messages == []
    row.refresh_from_db()
    assert row.status == OutgoingMessage.Status.DISCARDED
    assert "no recipients" in row.last_error
    assert summary.discarded == 1


def test_members_with_delivery_disabled_get_nothing(deliver_to, smtpd, mlist, first_post):
    Member.objects.filter(address="bperson@example.com").update(
        delivery_status=DeliveryStatus.BY_USER
    )
    Member.objects.create(
        mailing_list=mlist, address="d@example.com", delivery_status=DeliveryStatus.BY_BOUNCES
    )
    Member.objects.create(
        mailing_list=mlist, address="e@example.com", delivery_status=DeliveryStatus.BY_MODERATOR
    )

    queue_post(mlist, first_post)
    run()

    assert smtpd.messages[0].rcpt_tos == ["aperson@example.com", "cperson@example.com"]


def test_member_recipients_leaves_given_recipients_alone_even_when_empty(mlist, first_post):
    msgdata = {"recipients": set()}
    member_recipients(mlist, first_post, msgdata)
    assert msgdata["recipients"] == set()


def test_duplicates_in_any_case_are_delivered_once(deliver_to, smtpd, mlist, first_post):
    mlist.personalize = Personalization.INDIVIDUAL
    mlist.save()
    queue_post(
        mlist, first_post, {"recipients": ["a@example.com", "A@Example.com", "a@example.com"]}
    )
    run()

    assert [m.rcpt_tos for m in smtpd.messages] == [["a@example.com"]]


def test_a_delivered_post_is_never_sent_again(deliver_to, smtpd, mlist, first_post):
    queue_post(mlist, first_post)
    run()
    second = run()

    assert len(smtpd.messages) == 1
    assert second.posts == 0


def test_queued_metadata_keeps_extra_keys_and_drops_private_ones(mlist, first_post):
    msgdata = {"recipients": {"b@example.com", "a@example.com"}, "_parsemsg": False}
    row = to_outgoing(mlist, first_post, msgdata, verp=True, tolist=True)

    assert row.metadata == {"verp": True, "tolist": True, "listid": "test.example.com"}
    assert list(row.recipients.values_list("address", flat=True)) == [
        "a@example.com",
        "b@example.com",
    ]
    assert msgdata["recipients"] == {
        "b@example.com",
        "a@example.com",
    }  # the caller's dict is untouched


def test_queued_bytes_are_the_post_exactly(mlist):
    raw = FIRST_POST.encode()
    row = to_outgoing(mlist, message_from_bytes(raw), {"recipients": ["a@example.com"]})
    assert row.raw == raw
    assert (row.message_id, row.subject) == ("<first>", "My first post")


@pytest.mark.parametrize(
    ("max_recipients", "personalize"),
    [
        (0, Personalization.NONE),
        (2, Personalization.NONE),
        (3, Personalization.NONE),
        (10, Personalization.INDIVIDUAL),
    ],
)
def test_posts_read_together_and_posts_read_alone_each_reach_everyone_once(
    deliver_to, smtpd, mlist, first_post, monkeypatch, max_recipients, personalize
):
    from listdelivery import runner

    monkeypatch.setattr(runner, "PREFETCH_LIMIT", 7)  # the claim's read cuts the second post short
    deliver_to(MAX_RECIPIENTS=max_recipients, CHECKPOINT_EVERY=2)
    mlist.personalize = personalize
    mlist.save()
    sizes = [3, 9, 4]
    for number, size in enumerate(sizes):
        post = message_from_string(FIRST_POST.replace("<first>", f"<post-{number}>"))
        queue_post(mlist, post, {"recipients": {f"r{number}-{i}@example.com" for i in range(size)}})

    run()

    received = sorted((m.message["Message-ID"], r) for m in smtpd.messages for r in m.rcpt_tos)
    expected = sorted(
        (f"<post-{n}>", f"r{n}-{i}@example.com")
        for n, size in enumerate(sizes)
        for i in range(size)
    )
    assert received == expected
    if max_recipients == 0:  # unlimited: one transaction per post, even for the one read short
        assert len(smtpd.messages) == len(sizes)
    elif personalize == Personalization.NONE:  # batches of 2 transactions, as if read one by one
        batch = 2 * max_recipients
        chunks = [
            -(-min(batch, size - start) // max_recipients)
            for size in sizes
            for start in range(0, size, batch)
        ]
        assert len(smtpd.messages) == sum(chunks)
    assert set(OutgoingMessage.objects.values_list("status", flat=True)) == {"delivered"}
