"""``manage.py deliver_pending``: deliver every due post once, in this process, and exit."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from listdelivery.models import MailingList, OutgoingMessage
from listdelivery.runner import OutgoingRunner, RunSummary

PROGRESS_EVERY = 2.0  # seconds between progress lines on long runs


class Command(BaseCommand):
    help = "Deliver every post that is due (queued, or whose retry time has come), then exit."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--limit", type=int, help="Deliver at most this many posts.")
        parser.add_argument(
            "--list",
            dest="list_address",
            metavar="ADDRESS",
            help="Only posts to this list (its posting address).",
        )

    def handle(
        self,
        *args: Any,
        limit: int | None,
        list_address: str | None,
        verbosity: int,
        **options: Any,
    ) -> None:
        if limit is not None and limit < 1:
            raise CommandError("--limit must be at least 1.")
        if list_address and not MailingList.objects.filter(address__iexact=list_address).exists():
            raise CommandError(f"There is no mailing list {list_address!r}.")
        due = OutgoingMessage.objects.filter(status__in=OutgoingMessage.WAITING, shard_count=0)
        if list_address:
            due = due.filter(mailing_list__address__iexact=list_address)
        waiting = due.count()
        if limit:
            waiting = min(waiting, limit)
        last = [time.monotonic()]

        def on_post(row: OutgoingMessage, summary: RunSummary) -> None:
            if verbosity >= 2:
                self.stdout.write(
                    f"  {row.message_id or row.pk}: {row.get_status_display().lower()}"
                    + (f" ({row.last_error})" if row.last_error else "")
                )
            elif verbosity == 1 and time.monotonic() - last[0] >= PROGRESS_EVERY:
                last[0] = time.monotonic()
                self.stdout.write(
                    f"  … {summary.posts} of about {waiting} posts, "
                    f"{summary.recipients} recipients accepted"
                )

        summary = OutgoingRunner(limit=limit, list_address=list_address, on_post=on_post).run()
        if verbosity >= 1:
            style = (
                self.style.SUCCESS if not (summary.failed or summary.held) else self.style.WARNING
            )
            self.stdout.write(style(f"Delivered: {summary}"))
