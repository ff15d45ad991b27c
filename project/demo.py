"""The main job on the embedded default, end to end, with nothing to install but Python.

Migrates the SQLite database, loads the seed's list (test@example.com with
Anne, Bart and Cris), starts a local SMTP server, queues the seed's first
post the way Mailman's pipeline does, runs ``manage.py deliver_pending``, and
shows what each recipient received.

    python -m project.demo
"""

from __future__ import annotations

import os
import sys
from email import message_from_string

from listdelivery.testing import SMTPTestServer

POST = """\
From: aperson@example.com
To: test@example.com
Subject: My first post
Message-ID: <first-{n}@example.com>

First post!
"""


def main() -> int:
    server = SMTPTestServer().start()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ["LISTDELIVERY_SMTP_HOST"] = server.host
    os.environ["LISTDELIVERY_SMTP_PORT"] = str(server.port)
    os.environ["LISTDELIVERY_ENQUEUE_TASKS"] = "no"  # no cluster here: deliver_pending does it

    import django

    django.setup()
    from django.core.management import call_command

    from listdelivery.models import MailingList, OutgoingMessage
    from listdelivery.pipeline import after_delivery, member_recipients, to_outgoing

    try:
        call_command("migrate", verbosity=0)
        call_command("loaddata", "seed", verbosity=0)
        mlist = MailingList.objects.get(address="test@example.com")
        print(
            f"List {mlist.address} ({mlist.display_name}), {mlist.members.count()} members,"
            f" SMTP server listening on {server.host}:{server.port}"
        )

        msg = message_from_string(POST.format(n=OutgoingMessage.objects.count() + 1))
        msgdata: dict = {}
        member_recipients(mlist, msg, msgdata)
        row = to_outgoing(mlist, msg, msgdata, tolist=True)
        after_delivery(mlist, msg, msgdata)
        print(
            f"Queued {row.message_id} for {row.recipients.count()} recipients; post_id is now {mlist.post_id}\n"
        )

        call_command("deliver_pending", verbosity=2)

        print("\nThe SMTP server received:")
        for number, received in enumerate(server.messages, 1):
            print(
                f"--- transaction {number}: MAIL FROM:<{received.mail_from}> "
                f"RCPT TO:{', '.join(f'<{r}>' for r in received.rcpt_tos)}"
            )
            print(received.content.decode("utf-8", "replace").replace("\r\n", "\n"), end="")
        row.refresh_from_db()
        print(f"--- post {row.message_id} is {row.get_status_display().lower()}")
        return 0 if row.status == OutgoingMessage.Status.DELIVERED else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
