"""The admin in a real headless Chromium: log in, personalize a list, retry a post, see the dashboard.

Needs Debian's ``chromium`` and Playwright for Python (``.ci/browser-setup``
installs both); browsers are never downloaded. Skipped, with the reason, when
either is missing. Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connections
from django.utils import timezone

from listdelivery.models import (
    DeliveryHour,
    MailingList,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
)
from listdelivery.progress import hour_of

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

SCREENSHOTS = (
    "1-login",
    "2-admin-index",
    "3-mailing-lists",
    "4-retry-now",
    "5-outgoing-messages",
    "6-post",
    "7-dashboard",
)
Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


@pytest.fixture
def browser(live_server, monkeypatch):
    """Chromium, started after the live server and closed before it stops."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: run .ci/browser-setup (or set CHROMIUM)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed: run .ci/browser-setup"
    )
    # Playwright's sync API keeps an event loop in this thread; the ORM calls the
    # test makes between browser steps are ordinary blocking calls.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
        # Connections the test opened while Playwright's loop ran belong to that
        # context: close them here, or PostgreSQL cannot drop the test database.
        connections.close_all()


@pytest.fixture
def failed_post(transactional_db, mlist) -> OutgoingMessage:
    post = OutgoingMessage.objects.create(
        mailing_list=mlist,
        list_id=mlist.list_id,
        message=b"From: aperson@example.com\nSubject: Minutes\nMessage-ID: <minutes@example.com>\n\n"
        b"The minutes.\n",
        message_id="<minutes@example.com>",
        subject="Minutes",
        status=Status.FAILED,
        last_error="gave up: 1 recipients still failing after 5 days, 0:00:00 without progress",
        finished_at=timezone.now(),
    )
    earlier = timezone.now() - timedelta(hours=3)
    OutgoingRecipient.objects.bulk_create(
        [
            OutgoingRecipient(message=post, address="aperson@example.com", status=RStatus.SENT),
            OutgoingRecipient(
                message=post, address="bperson@example.com", status=RStatus.BOUNCED, smtp_code=550
            ),
            OutgoingRecipient(
                message=post, address="cperson@example.com", status=RStatus.FAILED, smtp_code=450
            ),
        ]
    )
    post.recipients.update(finished_at=earlier)
    # The hour's totals the runner keeps with those answers: what the dashboard charts.
    DeliveryHour.objects.create(
        hour=hour_of(earlier), list_id=mlist.list_id, sent=1, bounced=1, failed=1
    )
    return post


def test_a_list_administrator_personalizes_a_list_retries_a_post_and_reads_the_dashboard(
    browser, live_server, django_user_model, mlist, failed_post
):
    django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    page.set_default_timeout(15_000)

    def shot(name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    # Log in: the admin sends an anonymous visitor to its login page.
    page.goto(f"{live_server.url}/admin/")
    assert "/admin/login/" in page.url
    page.fill("#id_username", "admin")
    page.fill("#id_password", "pw")
    shot("1-login")
    page.click("input[type=submit]")
    page.wait_for_selector("#listdelivery-dashboard-link")
    shot("2-admin-index")

    # Personalize the list right from the change list.
    page.goto(f"{live_server.url}/admin/listdelivery/mailinglist/")
    page.select_option("select[name=form-0-personalize]", Personalization.INDIVIDUAL)
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist .success")
    shot("3-mailing-lists")
    mlist.refresh_from_db()
    assert mlist.personalize == Personalization.INDIVIDUAL

    # Retry the failed post with the action.
    page.goto(f"{live_server.url}/admin/listdelivery/outgoingmessage/?status__exact=failed")
    page.check("input[name=_selected_action]")
    page.select_option("select[name=action]", "retry_now")
    page.click("button[name=index]")
    success = page.wait_for_selector(".messagelist .success")
    assert "1 post is due now" in success.inner_text()
    shot("4-retry-now")
    failed_post.refresh_from_db()
    assert failed_post.status == Status.RETRY
    assert dict(failed_post.recipients.values_list("address", "status")) == {
        "aperson@example.com": RStatus.SENT,
        "bperson@example.com": RStatus.BOUNCED,
        "cperson@example.com": RStatus.PENDING,
    }
    page.goto(f"{live_server.url}/admin/listdelivery/outgoingmessage/")
    assert page.inner_text("td.field-remaining") == "1"
    assert "Waiting to retry" in page.inner_text("#result_list")
    shot("5-outgoing-messages")
    page.click("#result_list th.field-status a")
    page.wait_for_url("**/change/")
    assert "The minutes." in page.inner_text(".field-body pre")
    shot("6-post")

    # The dashboard, reached from the admin index.
    page.goto(f"{live_server.url}/admin/")
    page.click("#listdelivery-dashboard-link caption a")
    page.wait_for_selector("#verp-settings")
    assert page.locator("svg[role=img]").count() == 2
    assert "VERP_DELIVERY_INTERVAL" in page.inner_text("#verp-settings")
    assert MailingList.objects.get().address in page.inner_text("#post-counters")
    shot("7-dashboard")

    assert {path.name for path in ARTIFACTS.glob("*.png")} == {f"{n}.png" for n in SCREENSHOTS}
