"""The site's own tests of listdelivery, written as a site would: django.test and SMTPTestServer."""

import io

from django.conf import settings
from django.core.management import call_command
from django.test import override_settings
from listdelivery.models import DeliveryStatus, MailingList, Member, Personalization
from listdelivery.testing import SMTPTestServer

from accounts.models import User

from ..models import Announcement

LIST_ADDRESS = "community@lists.example.org"


def make_list(personalize: str = Personalization.NONE) -> MailingList:
    """The community list: Anne and Bart get posts, Cris stopped them herself."""
    mlist = MailingList.objects.create(address=LIST_ADDRESS, personalize=personalize)
    Member.objects.create(mailing_list=mlist, address="anne@example.com", display_name="Anne")
    Member.objects.create(mailing_list=mlist, address="bart@example.com", display_name="Bart")
    Member.objects.create(
        mailing_list=mlist,
        address="cris@example.com",
        display_name="Cris",
        delivery_status=DeliveryStatus.BY_USER,
    )
    return mlist


def make_announcement(mlist: MailingList, subject: str = "Summer fair") -> Announcement:
    editor, _ = User.objects.get_or_create(
        username="edith",
        defaults={"email": "edith@example.org", "first_name": "Edith", "last_name": "Editor"},
    )
    return Announcement.objects.create(
        mailing_list=mlist,
        author=editor,
        subject=subject,
        body="The summer fair is on Saturday at ten.",
    )


def deliver_to(server: SMTPTestServer, **extra) -> override_settings:
    """The site's LISTDELIVERY, pointed at the test server."""
    return override_settings(
        LISTDELIVERY={
            **settings.LISTDELIVERY,
            "SMTP_HOST": server.host,
            "SMTP_PORT": server.port,
            **extra,
        }
    )


def deliver_pending() -> str:
    out = io.StringIO()
    call_command("deliver_pending", stdout=out)
    return out.getvalue()
