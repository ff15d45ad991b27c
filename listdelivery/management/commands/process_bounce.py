"""``manage.py process_bounce``: record the bounces in messages from a file, stdin, an mbox or a Maildir.

Meant to be fed by the MTA for the lists' ``-bounces`` addresses, for example
with Postfix: ``test-bounces: "|/srv/site/manage.py process_bounce --recipient ${original_recipient}"``.
Each message is reported; one that is not a usable bounce is skipped with the
reason, never a crash, and the command exits 0 so the MTA does not bounce
the bounce.
"""

from __future__ import annotations

import mailbox
import sys
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from listdelivery.bounces import NotABounce, find_bounce, record_bounce

MAX_BOUNCE_BYTES = 10 * 1024 * 1024


class Command(BaseCommand):
    help = "Record bounces: find the member from the VERP'd address or the DSN, and score it."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "paths",
            nargs="*",
            metavar="PATH",
            help="A message file, an mbox file, a Maildir folder, or - for standard input (the default).",
        )
        parser.add_argument(
            "--list",
            dest="list_address",
            metavar="ADDRESS",
            help="The list the bounces belong to, when their addresses do not say.",
        )
        parser.add_argument(
            "--recipient",
            metavar="ADDRESS",
            help="The envelope recipient the MTA delivered to (a VERP'd bounces address).",
        )

    def handle(
        self,
        *args: Any,
        paths: list[str],
        list_address: str | None,
        recipient: str | None,
        verbosity: int,
        **options: Any,
    ) -> None:
        recorded = skipped = 0
        for source, raw in self._messages(paths or ["-"]):
            try:
                if len(raw) > MAX_BOUNCE_BYTES:
                    raise NotABounce(f"it is larger than {MAX_BOUNCE_BYTES // (1024 * 1024)} MB")
                bounce = record_bounce(
                    find_bounce(message_from_bytes(raw), recipient, list_address)
                )
            except NotABounce as reason:
                skipped += 1
                self.stderr.write(f"{source}: skipped: {reason}")
                continue
            for event in bounce.events:
                recorded += 1
                if verbosity >= 1:
                    self.stdout.write(
                        f"{source}: {event.address} bounced on {bounce.mailing_list} "
                        f"(found by {bounce.found_by.upper()})"
                    )
            for address in bounce.not_members:
                self.stderr.write(
                    f"{source}: skipped {address}: not a member of {bounce.mailing_list}"
                )
        if verbosity >= 1:
            self.stdout.write(f"{recorded} bounces recorded, {skipped} messages skipped")

    def _messages(self, paths: list[str]) -> Iterator[tuple[str, bytes]]:
        for path in paths:
            if path == "-":
                yield "stdin", sys.stdin.buffer.read()
                continue
            location = Path(path)
            if location.is_dir():
                if not (location / "cur").is_dir():
                    raise CommandError(f"{path} is a folder but not a Maildir (no cur/ inside).")
                box = mailbox.Maildir(location, factory=None, create=False)
                for key in sorted(box.iterkeys()):
                    yield f"{path}:{key}", box.get_bytes(key)
            elif not location.is_file():
                raise CommandError(f"{path} does not exist.")
            elif _starts_like_mbox(location):
                box = mailbox.mbox(location, create=False)
                for number, key in enumerate(box.iterkeys(), 1):
                    yield f"{path}#{number}", box.get_bytes(key)
            else:
                yield path, location.read_bytes()


def _starts_like_mbox(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(5) == b"From "
