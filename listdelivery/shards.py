"""Sharded posts: a big post split into pieces that several runners deliver at once.

A post queued for more than ``SHARD_SIZE`` recipients is split, in the
transaction that queues it, into shards of ``SHARD_SIZE`` recipients each.
A shard is an :class:`~listdelivery.models.OutgoingMessage` row with a
``parent``: it delivers the post's recipients whose ids run from its
``first_recipient`` to its ``last_recipient``, and has its own lease,
checkpoints, attempts and retry deadline, so a runner claims, delivers,
retries or gives up a shard exactly as it does a post (one shard per claim,
so that the other runners find the rest). The recipients stay the post's;
the message bytes are stored once, on the post.

The post itself is never claimed. Its status, counters and times are rolled
up from its shards' (:func:`rollup`) at every checkpoint and ending of a
shard, under a lock on the post's row, so the last shard to end ends the post,
once, and the post's page, the queue, health and metrics read the post alone.

VERP is decided once, when the post is split, so every shard sends alike.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Max, Min, Q, QuerySet, Sum
from django.utils import timezone

from . import rules, statements
from .models import OutgoingMessage, OutgoingRecipient

Status = OutgoingMessage.Status

#: The reason a runner gives a post (or a shard) none of whose recipients accepted it.
#: A shard failing so does not fail its post when other shards delivered.
NOBODY_ACCEPTED = "no recipient accepted the post"

ID_CHUNK = 10_000


def split(post: OutgoingMessage, config: dict[str, Any]) -> int:
    """Split ``post`` into shards when it has more than ``SHARD_SIZE`` recipients; how many."""
    size = config["SHARD_SIZE"]
    mlist = post.mailing_list
    if not size or post.recipient_count <= size or mlist is None:
        return 0
    metadata = dict(post.metadata)
    metadata.setdefault(
        "verp_reason", rules.verp_reason(mlist.personalize, mlist.post_id, metadata, config)
    )
    metadata.setdefault(
        "verp", rules.decide_verp(mlist.personalize, mlist.post_id, metadata, config)
    )
    metadata.setdefault("personalize", mlist.personalize)
    pieces: list[OutgoingMessage] = []
    piece: OutgoingMessage | None = None
    recipients = post.recipient_rows().order_by("id").values_list("id", "status")
    for pk, status in recipients.iterator(chunk_size=ID_CHUNK):
        if piece is None or piece.recipient_count == size:
            piece = OutgoingMessage(
                parent=post,
                mailing_list=mlist,
                list_id=post.list_id,
                message=b"",
                message_id=post.message_id,
                subject=post.subject,
                metadata=metadata,
                next_attempt_at=post.next_attempt_at,
                first_recipient=pk,
            )
            pieces.append(piece)
        piece.last_recipient = pk
        piece.recipient_count += 1
        if status == OutgoingRecipient.Status.FAILED:
            piece.failed_count += 1
    OutgoingMessage.objects.bulk_create(pieces)
    OutgoingMessage.objects.filter(pk=post.pk).update(shard_count=len(pieces), metadata=metadata)
    post.shard_count, post.metadata = len(pieces), metadata
    return len(pieces)


def family(posts: QuerySet[OutgoingMessage] | list[int]) -> QuerySet[OutgoingMessage]:
    """The rows of ``posts`` and of their shards, for an administrator's action."""
    ids = posts.values("pk") if isinstance(posts, QuerySet) else posts
    return OutgoingMessage.objects.filter(Q(pk__in=ids) | Q(parent__in=ids))


def add_progress(post_id: int, moved: dict[str, int], fields: dict[str, Any]) -> None:
    """A shard's checkpoint moved its counters and rate by ``moved``: move the post's as much.

    One UPDATE of increments, no lock and no count: cheap at every checkpoint.
    The post's rate is the sum of its shards'; the latest shard's estimated
    finish and lease stand for the post's (so a post whose shards go on is
    never "stalled"). The next :func:`rollup` (at a shard's ending) writes them
    all again from the shards.
    """
    increments = {name: change for name, change in moved.items() if change}
    increments["rate"] = moved["rate"]  # also where the post's rate was empty
    statements.add_to_post(
        post_id,
        increments,
        {
            "finish_estimate": fields["finish_estimate"],
            "leased_until": fields["leased_until"],
            "updated_at": timezone.now(),
        },
    )


def rollup(post_id: int) -> tuple[str, OutgoingMessage | None]:
    """Write the post's status, counters and times from its shards'; inside a transaction.

    Returns the post's status before and the post after (``None`` if it is gone).
    The post's row is locked first, so two shards ending at once end the post once.
    """
    post = OutgoingMessage.objects.select_for_update().filter(pk=post_id).first()
    if post is None:
        return "", None
    before = post.status
    groups = {
        row["status"]: row
        for row in OutgoingMessage.objects.filter(parent_id=post_id)
        .order_by()
        .values("status")
        .annotate(
            shards=Count("pk"),
            recipients=Sum("recipient_count"),
            sent=Sum("sent_count"),
            deferred=Sum("deferred_count"),
            bounced=Sum("bounced_count"),
            failed=Sum("failed_count"),
            rate=Sum("rate"),
            attempts=Max("attempts"),
            leased_until=Max("leased_until"),
            sending_since=Min("sending_since"),
            finish_estimate=Max("finish_estimate"),
            next_attempt_at=Min("next_attempt_at"),
            deliver_until=Max("deliver_until"),
            error=Max("last_error"),
            problem=Max("problem"),
            gave_up=Count("pk", filter=~Q(last_error=NOBODY_ACCEPTED)),
        )
    }
    if not groups:
        return before, post
    total = {
        name: sum(group[name] or 0 for group in groups.values())
        for name in ("recipients", "sent", "deferred", "bounced", "failed")
    }
    fields: dict[str, Any] = {
        "recipient_count": total["recipients"],
        "sent_count": total["sent"],
        "deferred_count": total["deferred"],
        "bounced_count": total["bounced"],
        "failed_count": total["failed"],
        "attempts": max(group["attempts"] or 0 for group in groups.values()),
        "updated_at": timezone.now(),
    }
    fields.update(_state(post, groups, total["sent"]))
    OutgoingMessage.objects.filter(pk=post_id).update(**fields)
    for name, value in fields.items():
        setattr(post, name, value)
    return before, post


def _state(post: OutgoingMessage, groups: dict[str, dict[str, Any]], sent: int) -> dict[str, Any]:
    """The post's status and the fields that go with it, from its shards' by status."""
    sending = groups.get(Status.SENDING)
    if sending:
        return {
            "status": Status.SENDING,
            "rate": sending["rate"],
            "leased_until": sending["leased_until"],
            "sending_since": post.sending_since or sending["sending_since"],
            "finish_estimate": sending["finish_estimate"],
            "problem": "",
        }
    idle = {"rate": None, "finish_estimate": None, "leased_until": None}
    waiting = [groups[s] for s in (Status.RETRY, Status.QUEUED) if s in groups]
    if waiting:
        return {
            **idle,
            "status": Status.RETRY if Status.RETRY in groups else Status.QUEUED,
            "next_attempt_at": min(g["next_attempt_at"] for g in waiting if g["next_attempt_at"])
            if any(g["next_attempt_at"] for g in waiting)
            else None,
            "deliver_until": max(
                (g["deliver_until"] for g in waiting if g["deliver_until"]), default=None
            ),
            "last_error": waiting[0]["error"] or "",
            "problem": waiting[0]["problem"] or "",
        }
    for status in (Status.HELD, Status.PAUSED):
        if status in groups:
            group = groups[status]
            return {
                **idle,
                "status": status,
                "next_attempt_at": group["next_attempt_at"],
                "last_error": group["error"] or "",
                "problem": group["problem"] or "",
            }
    # Every shard has ended: the post ends as one post would (see the runner's _ending).
    failed = groups.get(Status.FAILED)
    if Status.DISCARDED in groups:
        status, error = Status.DISCARDED, groups[Status.DISCARDED]["error"]
    elif failed and failed["gave_up"]:
        status, error = Status.FAILED, failed["error"]
    elif sent:
        status, error = Status.DELIVERED, ""
    else:
        status, error = Status.FAILED, NOBODY_ACCEPTED
    return {
        **idle,
        "status": status,
        "last_error": error or "",
        "problem": "",
        "finished_at": post.finished_at or timezone.now(),
    }
