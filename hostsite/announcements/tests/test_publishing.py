from django.db import transaction
from django.test import TestCase
from listdelivery.models import OutgoingMessage
from listdelivery.testing import SMTPTestServer

from ..publishing import publish
from . import LIST_ADDRESS, deliver_pending, deliver_to, make_announcement, make_list


class PublishingTests(TestCase):
    def test_a_published_announcement_reaches_every_enabled_member_once(self):
        announcement = make_announcement(make_list())
        with SMTPTestServer() as server, deliver_to(server):
            with transaction.atomic():
                post = publish(announcement)
            deliver_pending()
            self.assertTrue(server.wait_for(1), "the SMTP server received nothing")

        received = server.messages
        self.assertEqual(len(received), 1)
        self.assertEqual(received[0].rcpt_tos, ["anne@example.com", "bart@example.com"])
        self.assertEqual(received[0].mail_from, "community-bounces@lists.example.org")
        message = received[0].message
        self.assertEqual(message["Subject"], "Summer fair")
        self.assertEqual(message["From"], "Edith Editor <edith@example.org>")
        self.assertEqual(message["List-Id"], "Community <community.lists.example.org>")
        post.refresh_from_db()
        self.assertEqual(post.status, OutgoingMessage.Status.DELIVERED)
        announcement.refresh_from_db()
        self.assertEqual(announcement.post, post)
        self.assertIsNotNone(announcement.published_at)

    def test_an_announcement_rolled_back_with_the_sites_transaction_is_never_sent(self):
        announcement = make_announcement(make_list())
        with SMTPTestServer() as server, deliver_to(server):
            try:
                with transaction.atomic():
                    publish(announcement)
                    raise RuntimeError("the site's own save failed after publishing")
            except RuntimeError:
                pass
            deliver_pending()

        self.assertEqual(server.messages, [])
        self.assertFalse(OutgoingMessage.objects.filter(list_id="community.lists.example.org"))
        announcement.refresh_from_db()
        self.assertIsNone(announcement.published_at)

    def test_the_list_counts_the_post(self):
        mlist = make_list()
        with SMTPTestServer() as server, deliver_to(server):
            publish(make_announcement(mlist))
        mlist.refresh_from_db()
        self.assertEqual(mlist.post_id, 2)
        self.assertIsNotNone(mlist.last_post_at)
        self.assertEqual(mlist.address, LIST_ADDRESS)
