"""The admin: a list administrator's window onto delivery.

Lists (personalization, post counters, queue counts), members, the outgoing
queue (read-only, with "retry now" and "discard"), bounce events, and the
delivery dashboard at ``admin:listdelivery_dashboard``. Counts come from
subqueries in ``get_queryset``, so a change list costs the same few queries
whatever its size.
"""

from __future__ import annotations

import email
from email.message import Message
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.utils import flatten_fieldsets
from django.core.exceptions import PermissionDenied
from django.db import models, transaction
from django.db.models import Case, Count, Model, OuterRef, Q, QuerySet, Subquery, Value, When
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from . import dashboard, lease, progress, signals, tasks
from .admin_filters import DisabledFilter, HealthFilter, ProblemFilter
from .models import (
    BounceEvent,
    DeliveryStatus,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
)
from .pipeline import header_text

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status
PREVIEW_CHARS = 20_000
PROBLEM_ROWS = 50
RETRYABLE = (Status.QUEUED, Status.RETRY, Status.HELD, Status.FAILED)

# Link the dashboard from the admin index without replacing the host's AdminSite:
# the template extends whichever "admin/index.html" the site has. A site with its
# own index_template keeps it and can include "listdelivery/admin/dashboard_link.html".
if admin.site.index_template is None:
    admin.site.index_template = "listdelivery/admin/index.html"


def _count(model: type[Model], link: str, **filters: Any) -> Coalesce:
    """How many ``model`` rows point at the outer row: a subquery, never a query per row."""
    rows = (
        model.objects.filter(**{link: OuterRef("pk")}, **filters)
        .order_by()
        .values(link)
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(rows), 0)


# -- what the actions do ---------------------------------------------------------


def retry_posts(queryset: QuerySet[OutgoingMessage]) -> int:
    """Make the chosen waiting or failed posts due now; returns how many were changed.

    A post a runner is delivering right now (a live lease) is left alone. A
    failed post's recipients that failed for a temporary reason are queued
    again; bounced ones and invalid addresses stay as they are. The retry
    period starts again.
    """
    now = timezone.now()
    posts = OutgoingMessage.objects.filter(
        lease.free(),
        pk__in=queryset.values("pk"),
        status__in=RETRYABLE,
    )
    with transaction.atomic():
        OutgoingRecipient.objects.filter(
            message__in=posts.filter(status=Status.FAILED),
            status__in=(RStatus.FAILED, RStatus.DEFERRED),
        ).exclude(status=RStatus.FAILED, smtp_message__startswith="invalid address").update(
            status=RStatus.PENDING, finished_at=None
        )
        progress.recount(posts.filter(status=Status.FAILED))
        return lease.release(
            posts,
            status=Case(
                When(status=Status.QUEUED, then=Value(Status.QUEUED)), default=Value(Status.RETRY)
            ),
            next_attempt_at=now,
            deliver_until=None,
            last_failure_count=0,
            unexpected_errors=0,
            finished_at=None,
            updated_at=now,
        )


def pause_posts(queryset: QuerySet[OutgoingMessage]) -> int:
    """Pause the chosen waiting posts; returns how many were paused.

    A runner delivering one stops within about a second (its heartbeat reads
    the row), after the transaction in flight; recipients it has not reached
    stay open, so :func:`resume_posts` goes on exactly where it stopped. A
    paused post is never claimed, swept or given up.
    """
    posts = OutgoingMessage.objects.filter(
        pk__in=queryset.values("pk"), status__in=OutgoingMessage.WAITING
    )
    return lease.release(posts, status=Status.PAUSED, updated_at=timezone.now())


def resume_posts(queryset: QuerySet[OutgoingMessage]) -> int:
    """Make the chosen paused posts due now, with a fresh retry period; returns how many."""
    now = timezone.now()
    posts = OutgoingMessage.objects.filter(pk__in=queryset.values("pk"), status=Status.PAUSED)
    changed = posts.update(
        status=Case(When(attempts=0, then=Value(Status.QUEUED)), default=Value(Status.RETRY)),
        next_attempt_at=now,
        deliver_until=None,
        updated_at=now,
    )
    if changed:
        transaction.on_commit(tasks.enqueue_delivery, robust=True)
    return changed


def discard_posts(queryset: QuerySet[OutgoingMessage], by: str) -> int:
    """Stop delivering the chosen waiting posts; returns how many were discarded.

    A runner delivering one of them loses its lease and stops before its next
    transaction; one whose claim holds it but has not started it never starts it.
    """
    now = timezone.now()
    reason = f"discarded by {by}"
    posts = OutgoingMessage.objects.filter(
        pk__in=queryset.values("pk"), status__in=(*OutgoingMessage.WAITING, Status.PAUSED)
    )
    with transaction.atomic():
        chosen = list(posts.select_for_update(of=("self",)).select_related("mailing_list"))
        posts = posts.filter(pk__in=[post.pk for post in chosen])
        OutgoingRecipient.objects.filter(
            message__in=posts, status__in=OutgoingRecipient.OPEN
        ).update(status=RStatus.FAILED, smtp_message=reason, finished_at=now)
        progress.recount([post.pk for post in chosen])
        count = lease.release(
            posts, status=Status.DISCARDED, last_error=reason, finished_at=now, updated_at=now
        )
        for post in chosen:
            post.status, post.last_error = Status.DISCARDED, reason
            signals.send_on_commit(
                signals.post_discarded,
                OutgoingMessage,
                post=post,
                mailing_list=post.mailing_list,
                reason=reason,
            )
        return count


# -- reading a post --------------------------------------------------------------


def _header_text(value: Any) -> str:
    return header_text(value)  # never raises: a malformed encoded word stays as written


def first_text(msg: Message) -> str:
    """The first text/plain part (else the first text part), decoded; never rendered."""
    texts = [
        part
        for part in msg.walk()
        if part.get_content_maintype() == "text" and part.get_content_disposition() != "attachment"
    ]
    if not texts:
        return ""
    part = next((p for p in texts if p.get_content_subtype() == "plain"), texts[0])
    payload = part.get_payload(decode=True) or b""
    try:
        return payload.decode(part.get_content_charset() or "utf-8", "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


# -- the admins -------------------------------------------------------------------


@admin.register(MailingList)
class MailingListAdmin(admin.ModelAdmin):
    list_display = (
        "address",
        "display_name",
        "personalize",
        "post_id",
        "last_post_at",
        "queued",
        "retrying",
        "failed",
    )
    list_editable = ("personalize",)
    list_filter = ("personalize",)
    search_fields = ("address", "display_name")
    change_list_template = "listdelivery/admin/change_list.html"
    actions = ("pause", "resume")
    delivery_fields = (
        "list_id",
        "post_id",
        "last_post_at",
        "queued",
        "retrying",
        "failed",
        "members",
        "created_at",
    )
    readonly_fields = delivery_fields
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    def get_fieldsets(self, request: HttpRequest, obj: MailingList | None = None):
        fields = [f for f in self.get_fields(request, obj) if f not in self.delivery_fields]
        if obj is None:
            return [(None, {"fields": fields})]
        return [(None, {"fields": fields}), (_("Delivery"), {"fields": self.delivery_fields})]

    def get_queryset(self, request: HttpRequest) -> QuerySet[MailingList]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                queued_count=_count(OutgoingMessage, "mailing_list", status=Status.QUEUED),
                retrying_count=_count(
                    OutgoingMessage,
                    "mailing_list",
                    status__in=(Status.RETRY, Status.HELD, Status.PAUSED),
                ),
                failed_count=_count(OutgoingMessage, "mailing_list", status=Status.FAILED),
            )
        )

    def get_deleted_objects(self, objs, request: HttpRequest):
        """A summary per list instead of every member and bounce event it takes with it.

        Bounce events cannot be deleted on their own, but they go with their list.
        """
        lists = list(
            MailingList.objects.filter(pk__in=[mlist.pk for mlist in objs]).annotate(
                member_count=_count(Member, "mailing_list"),
                bounce_count=_count(BounceEvent, "mailing_list"),
                post_count=_count(OutgoingMessage, "mailing_list"),
            )
        )
        summary = [
            format_html(
                "{}: {} members and {} bounce events are deleted with it; its {} posts "
                "stay in the queue's history (waiting ones are discarded, not sent)",
                mlist,
                mlist.member_count,
                mlist.bounce_count,
                mlist.post_count,
            )
            for mlist in lists
        ]
        counts = {
            MailingList._meta.verbose_name_plural: len(lists),
            Member._meta.verbose_name_plural: sum(m.member_count for m in lists),
            BounceEvent._meta.verbose_name_plural: sum(m.bounce_count for m in lists),
        }
        return summary, counts, set(), []

    @admin.action(permissions=["change"], description=_("Pause delivery of their posts"))
    def pause(self, request: HttpRequest, queryset: QuerySet[MailingList]) -> None:
        posts = OutgoingMessage.objects.filter(mailing_list__in=queryset)
        chosen = posts.filter(status__in=OutgoingMessage.WAITING).count()
        _report(self, request, chosen, pause_posts(posts), "paused")

    @admin.action(permissions=["change"], description=_("Resume delivery of their posts"))
    def resume(self, request: HttpRequest, queryset: QuerySet[MailingList]) -> None:
        posts = OutgoingMessage.objects.filter(mailing_list__in=queryset)
        chosen = posts.filter(status=Status.PAUSED).count()
        _report(self, request, chosen, resume_posts(posts), "resumed")

    @admin.display(description=_("queued"), ordering="queued_count")
    def queued(self, obj: MailingList) -> int:
        return obj.queued_count

    @admin.display(description=_("retrying, held or paused"), ordering="retrying_count")
    def retrying(self, obj: MailingList) -> int:
        return obj.retrying_count

    @admin.display(description=_("failed"), ordering="failed_count")
    def failed(self, obj: MailingList) -> int:
        return obj.failed_count

    @admin.display(description=_("members"))
    def members(self, obj: MailingList) -> str:
        counts = Member.objects.filter(mailing_list=obj).aggregate(
            total=Count("pk"), enabled=Count("pk", filter=Q(delivery_status=DeliveryStatus.ENABLED))
        )
        url = reverse(f"{self.admin_site.name}:listdelivery_member_changelist")
        text = ngettext(
            "%(total)d member (%(enabled)d with delivery enabled)",
            "%(total)d members (%(enabled)d with delivery enabled)",
            counts["total"],
        )
        return format_html(
            '<a href="{}?mailing_list__id__exact={}">{}</a>', url, obj.pk, text % counts
        )

    def get_urls(self):
        view = self.admin_site.admin_view(self.dashboard_view)
        return [path("dashboard/", view, name="listdelivery_dashboard"), *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> TemplateResponse:
        if not dashboard.can_view(request.user):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": _("Delivery dashboard"),
            "opts": self.opts,
            **dashboard.context(request),
        }
        return TemplateResponse(request, "listdelivery/admin/dashboard.html", context)


@admin.register(Member)
class MemberAdmin(admin.ModelAdmin):
    list_display = (
        "address",
        "display_name",
        "mailing_list",
        "delivery_status",
        "bounce_score",
        "last_bounce_received",
        "created_at",
    )
    list_filter = ("mailing_list", "delivery_status", DisabledFilter)
    search_fields = ("address", "display_name")
    list_select_related = ("mailing_list",)
    autocomplete_fields = ("mailing_list",)
    show_full_result_count = False
    actions = ("enable_delivery", "disable_delivery")

    @admin.action(permissions=["change"], description=_("Enable delivery"))
    def enable_delivery(self, request: HttpRequest, queryset: QuerySet[Member]) -> None:
        self._set_delivery(request, queryset, DeliveryStatus.ENABLED)

    @admin.action(permissions=["change"], description=_("Disable delivery (by a moderator)"))
    def disable_delivery(self, request: HttpRequest, queryset: QuerySet[Member]) -> None:
        self._set_delivery(request, queryset, DeliveryStatus.BY_MODERATOR)

    def _set_delivery(self, request: HttpRequest, queryset: QuerySet[Member], status: str) -> None:
        members = Member.objects.filter(pk__in=queryset.values("pk")).exclude(
            delivery_status=status
        )
        skipped = 0
        if status == DeliveryStatus.ENABLED:
            # A member's own unsubscribe is theirs to undo, not a moderator's.
            skipped = members.filter(delivery_status=DeliveryStatus.BY_USER).count()
            members = members.exclude(delivery_status=DeliveryStatus.BY_USER)
        chosen = list(members.values_list("pk", flat=True))
        changed = members.update(
            delivery_status=status,
            # enabled again: the bounce score starts afresh, or the next bounce disables at once
            **(
                {"bounce_score": 0, "disabled_at": None}
                if status == DeliveryStatus.ENABLED
                else {"disabled_at": timezone.now()}
            ),
        )
        label = DeliveryStatus(status).label
        _log(request, Member.objects.filter(pk__in=chosen), f"Delivery set to “{label}”.")
        text = ngettext(
            "Delivery is now “%(status)s” for %(count)d member.",
            "Delivery is now “%(status)s” for %(count)d members.",
            changed,
        ) % {"status": label, "count": changed}
        if skipped:
            text += " " + ngettext(
                "%(count)d member who unsubscribed themselves was left alone.",
                "%(count)d members who unsubscribed themselves were left alone.",
                skipped,
            ) % {"count": skipped}
        self.message_user(request, text, messages.SUCCESS)


@admin.register(OutgoingMessage)
class OutgoingMessageAdmin(admin.ModelAdmin):
    """The queue, read-only: what was posted, to whom it is still going, and why not."""

    list_display = (
        "status",
        "mailing_list",
        "subject",
        "message_id",
        "remaining",
        "attempts",
        "next_attempt",
        "deliver_until",
        "error",
    )
    list_display_links = ("status", "subject")
    list_filter = ("status", HealthFilter, ProblemFilter, "mailing_list")
    search_fields = ("message_id", "subject")
    list_select_related = ("mailing_list",)
    show_full_result_count = False
    change_list_template = "listdelivery/admin/change_list.html"
    actions = ("retry_now", "pause", "resume", "discard")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "status",
                    "mailing_list",
                    "list_id",
                    "subject",
                    "message_id",
                    "created_at",
                    "finished_at",
                )
            },
        ),
        (
            _("Delivery"),
            {
                "fields": (
                    "attempts",
                    "next_attempt",
                    "deliver_until",
                    "last_failure_count",
                    "unexpected_errors",
                    "last_error",
                    "leased_until",
                    "recipient_counts",
                    "problem_recipients",
                )
            },
        ),
        (_("Message"), {"fields": ("headers", "body")}),
    )
    readonly_fields = flatten_fieldsets(fieldsets)

    def get_queryset(self, request: HttpRequest) -> QuerySet[OutgoingMessage]:
        return (
            super()
            .get_queryset(request)
            .defer("message")
            .annotate(
                remaining_count=_count(
                    OutgoingRecipient, "message", status__in=OutgoingRecipient.OPEN
                )
            )
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Change permission is what the actions need; a post itself is never edited.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a record of what was sent: cancel a post, never delete it

    @admin.display(description=_("next attempt"), ordering="next_attempt_at")
    def next_attempt(self, obj: OutgoingMessage) -> Any:
        if obj.next_attempt_at is None and obj.status == Status.HELD:
            return _("when an administrator retries it")
        return obj.next_attempt_at

    @admin.display(description=_("recipients remaining"), ordering="remaining_count")
    def remaining(self, obj: OutgoingMessage) -> int:
        return obj.remaining_count

    @admin.display(description=_("last error"), ordering="last_error")
    def error(self, obj: OutgoingMessage) -> str:
        return Truncator(obj.last_error).chars(80)

    @admin.display(description=_("recipients by status"))
    def recipient_counts(self, obj: OutgoingMessage) -> str:
        counts = dict(
            obj.recipients.order_by()
            .values_list("status")
            .annotate(n=Count("pk"))
            .values_list("status", "n")
        )
        rows = ((label, counts.get(value, 0)) for value, label in RStatus.choices)
        return format_html_join(mark_safe("<br>"), "{}: {}", rows)

    @admin.display(description=_("recipients not accepted (latest 50)"))
    def problem_recipients(self, obj: OutgoingMessage) -> str:
        rows = [
            (address, RStatus(status).label, code or "", text)
            for address, status, code, text in obj.recipients.exclude(status=RStatus.SENT)
            .order_by("-pk")
            .values_list("address", "status", "smtp_code", "smtp_message")[:PROBLEM_ROWS]
        ]
        if not rows:
            return _("none")
        head = format_html(
            "<tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
            _("address"),
            _("status"),
            _("SMTP code"),
            _("SMTP message"),
        )
        body = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows)
        return format_html("<table><thead>{}</thead><tbody>{}</tbody></table>", head, body)

    @admin.display(description=_("header fields"))
    def headers(self, obj: OutgoingMessage) -> str:
        rows = ((name, _header_text(value)) for name, value in self._parsed(obj).items())
        return format_html(
            "<table>{}</table>",
            format_html_join("", '<tr><th scope="row">{}</th><td>{}</td></tr>', rows),
        )

    @admin.display(description=_("text (preview, never rendered)"))
    def body(self, obj: OutgoingMessage) -> str:
        text = first_text(self._parsed(obj))
        note = ""
        if len(text) > PREVIEW_CHARS:
            note = _("Only the first %(shown)d of %(total)d characters are shown.") % {
                "shown": PREVIEW_CHARS,
                "total": len(text),
            }
        return format_html(
            '<pre style="white-space: pre-wrap; max-height: 40em; overflow: auto">{}</pre>{}',
            text[:PREVIEW_CHARS],
            note,
        )

    @staticmethod
    def _parsed(obj: OutgoingMessage) -> Message:
        if not hasattr(obj, "_parsed_message"):
            obj._parsed_message = email.message_from_bytes(obj.raw)
        return obj._parsed_message

    @admin.action(permissions=["change"], description=_("Retry now"))
    def retry_now(self, request: HttpRequest, queryset: QuerySet[OutgoingMessage]) -> None:
        chosen = queryset.count()
        retryable = list(queryset.filter(lease.free(), status__in=RETRYABLE).values_list("pk"))
        changed = retry_posts(queryset)
        _log(request, _now(retryable, status__in=(Status.QUEUED, Status.RETRY)), "Retried now.")
        transaction.on_commit(tasks.enqueue_delivery, robust=True)
        text = ngettext(
            "%(count)d post is due now and will be retried at the next delivery run.",
            "%(count)d posts are due now and will be retried at the next delivery run.",
            changed,
        ) % {"count": changed}
        if chosen > changed:
            text += " " + ngettext(
                "%(count)d was left alone: delivered, discarded, or being delivered right now.",
                "%(count)d were left alone: delivered, discarded, or being delivered right now.",
                chosen - changed,
            ) % {"count": chosen - changed}
        self.message_user(request, text, messages.SUCCESS)

    @admin.action(permissions=["change"], description=_("Pause delivery"))
    def pause(self, request: HttpRequest, queryset: QuerySet[OutgoingMessage]) -> None:
        chosen = list(queryset.filter(status__in=OutgoingMessage.WAITING).values_list("pk"))
        _report(self, request, queryset.count(), pause_posts(queryset), "paused")
        _log(request, _now(chosen, status=Status.PAUSED), "Paused delivery.")

    @admin.action(permissions=["change"], description=_("Resume delivery"))
    def resume(self, request: HttpRequest, queryset: QuerySet[OutgoingMessage]) -> None:
        chosen = list(queryset.filter(status=Status.PAUSED).values_list("pk"))
        _report(self, request, queryset.count(), resume_posts(queryset), "resumed")
        _log(request, _now(chosen, status__in=OutgoingMessage.WAITING), "Resumed delivery.")

    @admin.action(permissions=["change"], description=_("Cancel delivery (asks first)"))
    def discard(
        self, request: HttpRequest, queryset: QuerySet[OutgoingMessage]
    ) -> TemplateResponse | None:
        if request.POST.get("confirm") != "yes":
            stoppable = (*OutgoingMessage.WAITING, Status.PAUSED)
            posts = list(queryset.filter(status__in=stoppable).select_related("mailing_list"))
            return TemplateResponse(
                request,
                "listdelivery/admin/confirm_cancel.html",
                {
                    **self.admin_site.each_context(request),
                    "title": _("Cancel delivery"),
                    "opts": self.model._meta,
                    "posts": posts,
                    "chosen": list(queryset.values_list("pk", flat=True)),
                    "left_alone": queryset.count() - len(posts),
                    "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                },
            )
        stoppable = list(
            queryset.filter(status__in=(*OutgoingMessage.WAITING, Status.PAUSED)).values_list("pk")
        )
        chosen = queryset.count()
        changed = discard_posts(queryset, request.user.get_username())
        _log(request, _now(stoppable, status=Status.DISCARDED), "Cancelled delivery.")
        text = ngettext(
            "%(count)d post was discarded.", "%(count)d posts were discarded.", changed
        ) % {"count": changed}
        if chosen > changed:
            text += " " + ngettext(
                "%(count)d had already finished and was left alone.",
                "%(count)d had already finished and were left alone.",
                chosen - changed,
            ) % {"count": chosen - changed}
        self.message_user(request, text, messages.SUCCESS)
        return None


def _now(pks: list[tuple[int]], **state: Any) -> QuerySet[OutgoingMessage]:
    """Those of the chosen posts (``values_list("pk")`` rows) that are now in ``state``."""
    return OutgoingMessage.objects.filter(pk__in=[pk for (pk,) in pks], **state)


def _log(request: HttpRequest, queryset: QuerySet, message: str) -> None:
    """A "changed" LogEntry per object, so History and Recent actions say who did what."""
    LogEntry.objects.log_actions(request.user.pk, queryset, CHANGE, change_message=message)


def _report(
    model_admin: admin.ModelAdmin, request: HttpRequest, chosen: int, changed: int, done: str
) -> None:
    """ "N posts were paused. M were left alone: …" for a pause or resume action."""
    text = ngettext("%(count)d post was %(done)s.", "%(count)d posts were %(done)s.", changed) % {
        "count": changed,
        "done": done,
    }
    if chosen > changed:
        text += " " + ngettext(
            "%(count)d was left alone: it was not in a state to be %(done)s.",
            "%(count)d were left alone: they were not in a state to be %(done)s.",
            chosen - changed,
        ) % {"count": chosen - changed, "done": done}
    model_admin.message_user(request, text, messages.SUCCESS)


@admin.register(BounceEvent)
class BounceEventAdmin(admin.ModelAdmin):
    """What the SMTP server refused: a record, not something to edit."""

    list_display = ("created_at", "address", "mailing_list", "smtp_code", "diagnostic", "context")
    list_filter = ("context", "mailing_list", "smtp_code", "created_at")
    search_fields = ("address", "smtp_message", "message_id")
    list_select_related = ("mailing_list",)
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # what a server said: a record, scored already

    @admin.display(description=_("diagnostic"), ordering="smtp_message")
    def diagnostic(self, obj: BounceEvent) -> str:
        return Truncator(obj.smtp_message).chars(100)
