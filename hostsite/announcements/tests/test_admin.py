from django.test import TestCase
from django.urls import reverse
from listdelivery.testing import SMTPTestServer

from accounts.models import User

from ..publishing import publish
from . import deliver_pending, deliver_to, make_announcement, make_list


class AdminPagesTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.superuser = User.objects.create_superuser("root", "root@example.org", "not-used")
        mlist = make_list()
        with SMTPTestServer() as server, deliver_to(server):
            publish(make_announcement(mlist))
            deliver_pending()

    def setUp(self):
        self.client.force_login(self.superuser)

    def test_the_sites_own_index_keeps_its_note_and_links_the_delivery_dashboard(self):
        response = self.client.get(reverse("admin:index"))
        self.assertContains(response, 'id="community-editors-note"')
        self.assertContains(response, f'href="{reverse("admin:listdelivery_dashboard")}"')

    def test_the_delivery_dashboard_opens(self):
        response = self.client.get(reverse("admin:listdelivery_dashboard"))
        self.assertContains(response, "community@lists.example.org")

    def test_every_listdelivery_changelist_opens(self):
        for model in ("mailinglist", "member", "outgoingmessage", "bounceevent"):
            with self.subTest(model=model):
                response = self.client.get(reverse(f"admin:listdelivery_{model}_changelist"))
                self.assertEqual(response.status_code, 200)

    def test_a_delivered_post_shows_in_the_outgoing_messages(self):
        response = self.client.get(reverse("admin:listdelivery_outgoingmessage_changelist"))
        self.assertContains(response, "Summer fair")

    def test_the_sites_own_pages_still_open(self):
        for name in (
            "admin:announcements_announcement_changelist",
            "admin:accounts_user_changelist",
        ):
            with self.subTest(page=name):
                self.assertEqual(self.client.get(reverse(name)).status_code, 200)
