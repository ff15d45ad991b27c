import re

from django.test import Client, TestCase
from listdelivery.models import DeliveryStatus, Member, Personalization
from listdelivery.testing import SMTPTestServer

from ..publishing import publish
from . import deliver_pending, deliver_to, make_announcement, make_list

SITE = "https://lists.example.org"


def one_click_links(server: SMTPTestServer) -> dict[str, str]:
    """Each recipient's one-click link, from the List-Unsubscribe header of its copy."""
    links = {}
    for received in server.messages:
        message = received.message
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        header = " ".join(message["List-Unsubscribe"].split())
        links[received.rcpt_tos[0]] = re.search(r"<(https://[^>]+)>", header).group(1)
    return links


class OneClickUnsubscribeTests(TestCase):
    def test_a_member_unsubscribes_with_the_link_in_her_copy(self):
        mlist = make_list(personalize=Personalization.FULL)
        with SMTPTestServer() as server, deliver_to(server):
            publish(make_announcement(mlist))
            deliver_pending()
            self.assertTrue(server.wait_for(2), "the SMTP server did not get both copies")
            links = one_click_links(server)
            link = links["bart@example.com"]
            self.assertTrue(link.startswith(f"{SITE}/mailing-lists/unsubscribe/"), link)

            # What a mail client does (RFC 8058): a POST with no cookie and no CSRF token.
            response = Client(enforce_csrf_checks=True).post(
                link.removeprefix(SITE), {"List-Unsubscribe": "One-Click"}
            )
            self.assertEqual(response.status_code, 200)
            bart = Member.objects.get(address="bart@example.com")
            self.assertEqual(bart.delivery_status, DeliveryStatus.BY_USER)

            server.clear()
            publish(make_announcement(mlist, subject="Fair moved to Sunday"))
            deliver_pending()
            self.assertTrue(server.wait_for(1))
        self.assertEqual([m.rcpt_tos for m in server.messages], [["anne@example.com"]])
