"""``manage.py process_bounce``: record the bounces in messages from a file, stdin, an mbox or a Maildir.

Meant to be fed by the MTA for the lists' ``-bounces`` addresses, for example
with Postfix: ``test-bounces: "|/srv/site/manage.py process_bounce --recipient ${original_recipient}"``.
Each message is reported; one that is not a usable bounce — or that cannot
be read at all — is skipped with the reason, and the command exits 0 so the
MTA does not bounce the bounce. No message is read past
``MAX_BOUNCE_BYTES`` + 1 bytes.
"""

from __future__ import annotations

import mailbox
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from listdelivery.bounces import MAX_BOUNCE_BYTES, NotABounce, read_bounces, record_bounce

TOO_LARGE = f"it is larger than {MAX_BOUNCE_BYTES // (1024 * 1024)} MB"


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
                if raw is None:
                    raise NotABounce(TOO_LARGE)
                bounces = read_bounces(raw, recipient, list_address)
                with transaction.atomic():
                    for bounce in bounces:
                        record_bounce(bounce)
            except NotABounce as reason:
                skipped += 1
                self.stderr.write(f"{source}: skipped: {reason}")
                continue
            except Exception as error:  # never a traceback for the MTA to bounce
                skipped += 1
                text = " ".join(str(error).split())[:200]
                self.stderr.write(
                    f"{source}: skipped: it could not be processed ({type(error).__name__}: {text})"
                )
                continue
            for bounce in bounces:
                for event in bounce.events:
                    recorded += 1
                    if verbosity >= 1:
                        self.stdout.write(
                            f"{source}: {event.address} bounced on {bounce.mailing_list} "
                            f"(found by {bounce.found_by.upper()})"
                        )
                for address in bounce.already_recorded:
                    if verbosity >= 1:
                        self.stdout.write(
                            f"{source}: {address} on {bounce.mailing_list}: "
                            "this bounce was already recorded"
                        )
                for address in bounce.not_members:
                    self.stderr.write(
                        f"{source}: skipped {address}: not a member of {bounce.mailing_list}"
                    )
        if verbosity >= 1:
            self.stdout.write(f"{recorded} bounces recorded, {skipped} messages skipped")

    def _messages(self, paths: list[str]) -> Iterator[tuple[str, bytes | None]]:
        """``(where, bytes)`` for every message; ``None`` for bytes over the limit."""
        for path in paths:
            if path == "-":
                yield "stdin", _read_limited(sys.stdin.buffer, drain=True)
                continue
            location = Path(path)
            if location.is_dir():
                if not (location / "cur").is_dir():
                    raise CommandError(f"{path} is a folder but not a Maildir (no cur/ inside).")
                box = mailbox.Maildir(location, factory=None, create=False)
                for key in sorted(box.iterkeys()):
                    yield f"{path}:{key}", _read_closing(box.get_file(key))
            elif not location.is_file():
                raise CommandError(f"{path} does not exist.")
            elif _starts_like_mbox(location):
                box = mailbox.mbox(location, create=False)
                for number, key in enumerate(box.iterkeys(), 1):
                    yield f"{path}#{number}", _read_closing(box.get_file(key))
            else:
                with location.open("rb") as file:
                    yield path, _read_limited(file)


def _read_limited(file: IO[bytes], drain: bool = False) -> bytes | None:
    """At most ``MAX_BOUNCE_BYTES`` of ``file``; ``None`` if there is more.

    With ``drain``, the rest is read and dropped a piece at a time, so that the
    MTA writing into a pipe sees its message taken.
    """
    data = file.read(MAX_BOUNCE_BYTES + 1)
    if len(data) <= MAX_BOUNCE_BYTES:
        return data
    del data
    while drain and file.read(1024 * 1024):
        pass
    return None


def _read_closing(file: IO[bytes]) -> bytes | None:
    try:
        return _read_limited(file)
    finally:
        file.close()


def _starts_like_mbox(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(5) == b"From "
