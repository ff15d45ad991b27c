"""The admin in a real headless Chromium: log in, personalize a list, retry a post, see the dashboard.

Needs Debian's ``chromium`` and Playwright for Python (``.ci/browser-setup``
installs both); browsers are never downloaded. Skipped, with the reason, when
either is missing. Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from email import message_from_string
from pathlib import Path

import pytest
from django.db import connections
from django.utils import timezone

from listdelivery.models import (
    DeliveryHour,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
)
from listdelivery.progress import hour_of

from .conftest import deliver_pending, queue_post, subprocess_environment

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
# The post going out: taken by the second test.
SENDING_SCREENSHOTS = (
    "8-queue-sending",
    "9-post-sending",
    "10-post-paused",
    "11-post-delivered",
    "11-post-delivered-phone",
    "12-members",
    "13-bounce-events",
    "14-dashboard-after",
    "15-forbidden",
)
MEMBERS = 3_000
Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status


@pytest.fixture(scope="module", autouse=True)
def fresh_artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()


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
    assert "1 / 3 accepted · 0 deferred · 1 bounced" in page.inner_text("td.field-state")
    assert "Waiting to retry" in page.inner_text("#result_list")
    shot("5-outgoing-messages")
    page.click("#result_list th.field-subject_line a")
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

    assert {f"{n}.png" for n in SCREENSHOTS} <= {path.name for path in ARTIFACTS.glob("*.png")}


def test_an_administrator_watches_a_post_go_out_pauses_it_and_resumes_it(
    browser, transactional_db, live_server, django_user_model, settings, smtpd
):
    """A real runner process sends to 3,000 members through a slowed server."""
    settings.LISTDELIVERY = {"ENQUEUE_TASKS": False}  # the runners below are the test's own
    mlist = MailingList.objects.create(address="big@example.com")
    Member.objects.bulk_create(
        Member(mailing_list=mlist, address=f"member{i:05d}@example.org") for i in range(MEMBERS)
    )
    gone = "member00007@example.org"
    smtpd.fail_rcpt = {gone: "550 5.1.1 No such user"}
    smtpd.delay = 0.02  # each DATA: 300 transactions of 10 take some 6-8 s
    msg = message_from_string(
        "From: aperson@example.com\nSubject: Big news\nMessage-ID: <big@example.com>\n\nNews!\n"
    )
    post = queue_post(mlist, msg)
    runner_environment = subprocess_environment(
        smtpd, MAX_RECIPIENTS=10, CHECKPOINT_EVERY=5, ENQUEUE_TASKS="no"
    )
    django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    django_user_model.objects.create_user("helper", password="pw", is_staff=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(20_000)
    post_url = f"{live_server.url}/admin/listdelivery/outgoingmessage/{post.pk}/change/"

    def shot(name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    log_in(page, live_server, "admin")
    first = deliver_pending(runner_environment)

    # The queue: the row says "Sending" with its progress, and fits at 1280 px.
    queue = f"{live_server.url}/admin/listdelivery/outgoingmessage/"
    page.goto(queue)
    while not page.locator("#result_list .ld-sending").count():
        page.wait_for_timeout(200)
        page.goto(queue)
    assert "/ 3,000 accepted" in page.inner_text("td.field-state")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    fits = "(box => box.scrollWidth <= box.clientWidth)(document.querySelector('.results'))"
    shot("8-queue-sending")
    assert page.evaluate(fits), "every column of the queue fits at 1280 px"
    shot("8-queue-sending")

    # The post's page: the progress moves without a reload.
    page.goto(post_url)
    page.evaluate("window.notReloaded = true")
    before = page.inner_text("#post-progress .ld-counts")
    page.wait_for_function(
        "before => document.querySelector('#post-progress .ld-counts').textContent.trim()"
        " !== before.trim()",
        arg=before,
    )
    assert page.evaluate("window.notReloaded") is True, "the block was fetched, not the page"
    shot("9-post-sending")

    # Pause: once the page says the runner stopped, the server receives nothing more.
    page.click("#post-pause")
    page.wait_for_selector(".messagelist .success")
    page.wait_for_selector("#post-attempts .ld-outcome:has-text('paused')")
    assert page.locator("#post-progress [data-state=paused]").count() == 1
    shot("10-post-paused")
    _, stderr = first.communicate(timeout=30)
    assert first.returncode == 0, stderr.decode()
    received = len(smtpd.messages)
    time.sleep(2)
    assert len(smtpd.messages) == received, "the server received mail after the post was paused"
    assert 0 < received < MEMBERS / 10, "paused mid-way"

    # Resume: a runner goes on where the first stopped, and the page follows it to the end.
    page.click("#post-resume")
    page.wait_for_selector(".messagelist .success")
    second = deliver_pending(runner_environment)
    page.wait_for_selector("#post-attempts .ld-outcome:has-text('delivered')", timeout=30_000)
    assert "Delivered" in page.inner_text("#post-progress")
    assert "2,999 / 3,000 accepted · 0 deferred · 1 bounced" in page.inner_text("#post-progress")
    assert "5.1.1 No such user" in page.inner_text("#post-refusals")
    shot("11-post-delivered")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: tables scroll in their box
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    attempts = "(box => box.scrollWidth > box.clientWidth)(document.querySelector('#post-attempts .ld-scroll'))"
    assert page.evaluate(attempts), "the attempts table scrolls inside its box"
    shot("11-post-delivered-phone")
    page.set_viewport_size({"width": 1280, "height": 900})
    _, stderr = second.communicate(timeout=30)
    assert second.returncode == 0, stderr.decode()
    counts = smtpd.recipients_count()
    assert len(counts) == MEMBERS - 1 and gone not in counts
    assert set(counts.values()) == {1}, "a member got the post twice"

    # Which members bounce: the member list shows the reply and links to the events.
    page.goto(f"{live_server.url}/admin/listdelivery/member/?q=member0000")
    assert "550 5.1.1 No such user" in page.inner_text("#result_list")
    shot("12-members")
    page.click("#result_list td.field-bounce_events a")
    page.wait_for_url("**/bounceevent/**")
    assert page.locator("#result_list tbody tr").count() == 1
    assert gone in page.inner_text("#result_list")
    shot("13-bounce-events")
    page.goto(f"{live_server.url}/admin/listdelivery/mailinglist/dashboard/")
    shot("14-dashboard-after")

    # A staff member without permission gets the admin's own 403 page, and no link to it.
    helper = browser.new_page(viewport={"width": 1280, "height": 900})
    log_in(helper, live_server, "helper")
    assert helper.locator("#listdelivery-dashboard-link").count() == 0
    response = helper.goto(f"{live_server.url}/admin/listdelivery/mailinglist/dashboard/")
    assert response.status == 403
    assert "You do not have permission to see the delivery dashboard." in helper.inner_text(
        "#content"
    )
    helper.screenshot(path=str(ARTIFACTS / "15-forbidden.png"), full_page=True)

    names = {path.name for path in ARTIFACTS.glob("*.png")}
    assert {f"{n}.png" for n in SENDING_SCREENSHOTS} <= names


def log_in(page, live_server, username: str) -> None:
    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", "pw")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/")
