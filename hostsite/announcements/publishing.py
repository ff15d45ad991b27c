"""Publishing an announcement: the site's own code calling listdelivery's pipeline."""

from email.utils import formataddr, make_msgid

from django.core.mail import EmailMessage
from django.db import transaction
from django.utils import timezone
from listdelivery.models import OutgoingMessage
from listdelivery.pipeline import after_delivery, member_recipients, to_outgoing

from .models import Announcement


def publish(announcement: Announcement) -> OutgoingMessage:
    """Queue the announcement for every enabled member; the post and the site's row commit together."""
    mlist = announcement.mailing_list
    author = announcement.author
    message = EmailMessage(
        subject=announcement.subject,
        body=announcement.body,
        from_email=formataddr((author.get_full_name(), author.email)),
        to=[mlist.address],
        headers={"Message-ID": make_msgid(domain=mlist.mail_host)},
    ).message()
    msgdata: dict = {}
    with transaction.atomic():
        member_recipients(mlist, message, msgdata)
        post = to_outgoing(mlist, message, msgdata, tolist=True)
        after_delivery(mlist, message, msgdata)
        announcement.post = post
        announcement.published_at = timezone.now()
        announcement.save(update_fields=["post", "published_at"])
    return post
