"""The admin: a list administrator's window onto delivery.

Lists (personalization, post counters, queue counts), members, the outgoing
queue (read-only, with "retry now" and "discard"), bounce events, and the
delivery dashboard at ``admin:listdelivery_dashboard``. Counts come from
subqueries in ``get_queryset``, so a change list costs the same few queries
whatever its size.
"""

from __future__ import annotations

import email
from collections.abc import Callable
from datetime import timedelta
from email.message import Message
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.utils import flatten_fieldsets, quote, unquote
from django.core.exceptions import ImproperlyConfigured
from django.db import models, transaction
from django.db.models import (
    Case,
    Count,
    Exists,
    Model,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Coalesce
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import dateformat, timezone
from django.utils.formats import number_format
from django.utils.html import format_html, format_html_join
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from . import conf, dashboard, lease, progress, rules, shards, signals, tasks
from .admin_filters import DisabledFilter, HealthFilter, ProblemFilter
from .models import (
    BounceEvent,
    DeliveryAttempt,
    DeliveryStatus,
    MailingList,
    Member,
    OutgoingMessage,
    OutgoingRecipient,
    Personalization,
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
    period starts again. A sharded post's shards are retried with it.
    """
    now = timezone.now()
    with transaction.atomic():
        posts = OutgoingMessage.objects.filter(
            lease.free(), pk__in=queryset.values("pk"), status__in=RETRYABLE
        )
        rows = shards.family(list(posts.values_list("pk", flat=True)))
        rows = rows.filter(lease.free(), status__in=RETRYABLE)
        failed = list(rows.filter(status=Status.FAILED))
        for row in failed:
            row.recipient_rows().filter(status__in=(RStatus.FAILED, RStatus.DEFERRED)).exclude(
                status=RStatus.FAILED, smtp_message__startswith="invalid address"
            ).update(status=RStatus.PENDING, finished_at=None)
        progress.recount([row.pk for row in failed])
        fields = {
            "status": Case(
                When(status=Status.QUEUED, then=Value(Status.QUEUED)), default=Value(Status.RETRY)
            ),
            "next_attempt_at": now,
            "deliver_until": None,
            "last_failure_count": 0,
            "unexpected_errors": 0,
            "finished_at": None,
            "updated_at": now,
        }
        return _change_family(rows, lambda chosen: lease.release(chosen, **fields))


def pause_posts(queryset: QuerySet[OutgoingMessage]) -> int:
    """Pause the chosen waiting posts (and their shards); returns how many were paused.

    A runner delivering one stops within about a second (its heartbeat reads
    the row), after the transaction in flight; recipients it has not reached
    stay open, so :func:`resume_posts` goes on exactly where it stopped. A
    paused post is never claimed, swept or given up.
    """
    with transaction.atomic():
        rows = shards.family(queryset).filter(status__in=OutgoingMessage.WAITING)
        return _change_family(
            rows,
            lambda chosen: lease.release(chosen, status=Status.PAUSED, updated_at=timezone.now()),
        )


def resume_posts(queryset: QuerySet[OutgoingMessage]) -> int:
    """Make the chosen paused posts due now, with a fresh retry period; returns how many."""
    now = timezone.now()
    fields = {
        "status": Case(When(attempts=0, then=Value(Status.QUEUED)), default=Value(Status.RETRY)),
        "next_attempt_at": now,
        "deliver_until": None,
        "updated_at": now,
    }
    with transaction.atomic():
        rows = shards.family(queryset).filter(status=Status.PAUSED)
        runners = rows.filter(parent__isnull=False).count() or 1
        changed = _change_family(rows, lambda chosen: chosen.update(**fields))
    if changed:

        def enqueue_delivery() -> None:
            tasks.enqueue_delivery(runners=runners)

        transaction.on_commit(enqueue_delivery, robust=True)
    return changed


def discard_posts(queryset: QuerySet[OutgoingMessage], by: str) -> int:
    """Stop delivering the chosen waiting posts (and their shards); returns how many.

    A runner delivering one of them loses its lease and stops before its next
    transaction; one whose claim holds it but has not started it never starts it.
    """
    now = timezone.now()
    reason = f"discarded by {by}"
    open_statuses = (*OutgoingMessage.WAITING, Status.PAUSED)
    with transaction.atomic():
        posts = OutgoingMessage.objects.filter(
            pk__in=queryset.values("pk"), status__in=open_statuses, parent=None
        )
        chosen = list(posts.select_for_update(of=("self",)).select_related("mailing_list"))
        rows = shards.family([post.pk for post in chosen]).filter(status__in=open_statuses)
        OutgoingRecipient.objects.filter(
            message__in=[post.pk for post in chosen], status__in=OutgoingRecipient.OPEN
        ).update(status=RStatus.FAILED, smtp_message=reason, finished_at=now)
        progress.recount(list(rows.values_list("pk", flat=True)))
        count = _change_family(
            rows,
            lambda chosen: lease.release(
                chosen, status=Status.DISCARDED, last_error=reason, finished_at=now, updated_at=now
            ),
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


def _change_family(
    rows: QuerySet[OutgoingMessage], change: Callable[[QuerySet[OutgoingMessage]], int]
) -> int:
    """Apply ``change`` to the shards among ``rows``, then to the posts; how many posts changed.

    Shards before posts, in the order a runner's checkpoint locks them, and then
    each sharded post is rolled up from its shards again.
    """
    parents = set(rows.filter(parent__isnull=False).values_list("parent_id", flat=True))
    change(rows.filter(parent__isnull=False))
    count = change(rows.filter(parent__isnull=True))
    for parent in sorted(parents):
        shards.rollup(parent)
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


# -- how far a post has got, and why ------------------------------------------------

#: Buttons on a post's page: URL name suffix -> the action it runs.
BUTTONS = {"retry": "retry_now", "pause": "pause", "resume": "resume", "cancel": "discard"}
REFUSAL_GROUPS = 50
#: States in which a post's page keeps polling its progress.
MOVING = ("sending", "stalled", "stopping")


def _config() -> dict[str, Any]:
    """The settings, or the defaults when they cannot be read (the dashboard says why)."""
    try:
        return conf.get_config()
    except ImproperlyConfigured:
        return dict(conf.DEFAULTS)


def _number(value: int) -> str:
    return number_format(value, force_grouping=True)


def moment(when: Any) -> str:
    """A time with its zone: "14:32 UTC" today, "3 Dec 2025, 14:32 UTC" on another day."""
    local = timezone.localtime(when)
    if local.date() == timezone.localdate():
        return dateformat.format(local, "H:i T")
    return dateformat.format(local, "j M Y, H:i T")


def post_state(post: OutgoingMessage) -> str:
    """The status, told apart where it matters: ``stalled``, ``limited`` and ``scheduled`` too."""
    if post.is_stalled:
        return "stalled"
    if is_limited(post):
        return "limited"
    if post.is_scheduled:
        return "scheduled"
    return post.status


def is_limited(post: OutgoingMessage) -> bool:
    """Set aside until a sending limit (rate, daily quota, session cap) lets it go on."""
    return (
        post.problem == "limited"
        and post.status in (Status.QUEUED, Status.RETRY)
        and post.next_attempt_at is not None
        and post.next_attempt_at > timezone.now()
    )


def status_text(post: OutgoingMessage, state: str | None = None) -> str:
    """What a list administrator reads: "Sending", "Scheduled for 3 Dec 2025, 09:00 UTC" …"""
    state = state or post_state(post)
    if state == "stalled":
        return str(_("Sending — stalled, will be taken over"))
    if state == "limited":
        return str(_("Waits for a sending limit until %(when)s")) % {
            "when": moment(post.next_attempt_at)
        }
    if state == "scheduled":
        return str(_("Scheduled for %(when)s")) % {"when": moment(post.next_attempt_at)}
    if state == "stopping":
        return str(_("%(status)s — the runner stops after the transaction in flight")) % {
            "status": post.get_status_display()
        }
    if post.status == Status.HELD and post.problem:
        return str(_("Held: %(problem)s")) % {"problem": post.problem}
    return str(post.get_status_display())


def counts_text(post: OutgoingMessage) -> str:
    """ "12,345 / 20,000 accepted · 12 deferred · 3 bounced · 0 failed · 850/s · done ≈ 14:32 UTC"."""
    parts = [
        str(_("%(sent)s / %(total)s accepted"))
        % {"sent": _number(post.sent_count), "total": _number(post.recipient_count)},
        str(_("%s deferred")) % _number(post.deferred_count),
        str(_("%s bounced")) % _number(post.bounced_count),
        str(_("%s failed")) % _number(post.failed_count),
    ]
    if post.status == Status.SENDING and not post.is_stalled:
        if post.rate:
            parts.append(f"{post.rate:,.0f}/s" if post.rate >= 10 else f"{post.rate:.1f}/s")
        if post.finish_estimate:
            parts.append(str(_("done ≈ %s")) % moment(post.finish_estimate))
    return " · ".join(parts)


def progress_bar(post: OutgoingMessage) -> str:
    """A ``<progress>`` of the recipients with a final answer; nothing for a post to no one."""
    if not post.recipient_count:
        return ""
    done = post.recipient_count - post.open_count
    return format_html(
        '<progress max="{}" value="{}" aria-label="{}">{}%</progress>',
        post.recipient_count,
        done,
        _("recipients answered"),
        int(post.progress * 100),
    )


def runner_finishing(post: OutgoingMessage, attempts: list[DeliveryAttempt] | None = None) -> bool:
    """Paused or cancelled while a runner was sending it, and that runner has not stopped yet.

    A runner that stops records its attempt; until then it may finish the
    transaction in flight. After a lease's length it has stopped in any case.
    """
    if post.status not in (Status.PAUSED, Status.DISCARDED):
        return False
    if post.updated_at < timezone.now() - _config()["LEASE_DURATION"]:
        return False
    if post.shard_count:  # a shard that was being sent and has not recorded its attempt
        recorded = DeliveryAttempt.objects.filter(
            message=OuterRef("pk"), number=OuterRef("attempts")
        )
        return (
            post.shards.filter(status=post.status, sending_since__isnull=False)
            .exclude(Exists(recorded))
            .filter(updated_at__gte=timezone.now() - _config()["LEASE_DURATION"])
            .exists()
        )
    if post.sending_since is None:
        return False
    if attempts is None:
        return not post.attempt_log.filter(number=post.attempts).exists()
    return all(attempt.number != post.attempts for attempt in attempts)


def refusal_groups(post: OutgoingMessage) -> list[dict[str, Any]]:
    """Recipients not accepted, grouped by reply, largest first: one GROUP BY, no pending rows."""
    rows = (
        post.recipients.filter(status__in=(RStatus.DEFERRED, RStatus.BOUNCED, RStatus.FAILED))
        .order_by()
        .values("status", "smtp_code", "smtp_message")
        .annotate(recipients=Count("pk"))
        .order_by("-recipients", "status", "smtp_code", "smtp_message")[:REFUSAL_GROUPS]
    )
    return [{**row, "status_label": RStatus(row["status"]).label} for row in rows]


def personalization_decision(post: OutgoingMessage) -> str:
    """How this post was (or will be) delivered: one copy, or one per member."""
    metadata = post.metadata if isinstance(post.metadata, dict) else {}
    if metadata.get("personalize") in Personalization.values:
        return str(Personalization(metadata["personalize"]).label)
    if post.mailing_list is None:
        return str(_("Unknown: the list was deleted before this post was delivered."))
    return str(
        _("%(label)s — the list's current setting; this post has no record of its own yet.")
    ) % {"label": Personalization(post.mailing_list.personalize).label}


def verp_decision(post: OutgoingMessage) -> str:
    """Whether this post's envelope is VERP'd, and which rule said so."""
    metadata = post.metadata if isinstance(post.metadata, dict) else {}
    config = _config()
    personalize = metadata.get("personalize") or (
        post.mailing_list.personalize if post.mailing_list else Personalization.NONE
    )
    interval = config["VERP_DELIVERY_INTERVAL"]
    if personalize != Personalization.NONE:
        setting = bool(config["VERP_PERSONALIZED_DELIVERIES"])
        why = (
            _("the list is personalized and VERP_PERSONALIZED_DELIVERIES is on")
            if setting
            else _("the list is personalized and VERP_PERSONALIZED_DELIVERIES is off")
        )
        expected: bool | None = setting
    elif interval <= 0:
        why, expected = _("VERP_DELIVERY_INTERVAL is 0: no post is VERP'd"), False
    elif interval == 1:
        why, expected = _("VERP_DELIVERY_INTERVAL is 1: every post is VERP'd"), True
    else:
        why, expected = (
            _("VERP_DELIVERY_INTERVAL is %(n)d: every %(n)dth post of the list is VERP'd")
            % {"n": interval},
            None,
        )
    if "verp" not in metadata:
        if post.mailing_list is None:
            return str(_("Not decided: the list was deleted."))
        verp = rules.decide_verp(personalize, post.mailing_list.post_id, metadata, config)
        answer = _("Yes, if it were delivered now") if verp else _("No, if it were delivered now")
        return f"{answer}: {why}."
    verp = bool(metadata["verp"])
    answer = _("Yes") if verp else _("No")
    if metadata.get("verp_reason"):  # written by the runner when it decided
        return f"{answer}: {metadata['verp_reason']}."
    if expected is not None and expected != verp:
        why = _(
            "set for this post by whoever queued it (its metadata), or the settings "
            "have changed since"
        )
    return f"{answer}: {why}."


def may_view(request: HttpRequest, admin_site: admin.AdminSite, model: type[Model]) -> bool:
    """Whether a link to ``model``'s pages would open for this user (no link otherwise)."""
    model_admin = admin_site._registry.get(model)
    return model_admin is not None and model_admin.has_view_permission(request)


def forbidden(request: HttpRequest, admin_site: admin.AdminSite, what: str) -> TemplateResponse:
    """The admin's own look for "you may not", instead of the site's bare 403 page."""
    context = {**admin_site.each_context(request), "title": _("Permission denied"), "what": what}
    return TemplateResponse(request, "listdelivery/admin/forbidden.html", context, status=403)


class ListRowForm(forms.ModelForm):
    """A row of the lists' change list: its select says which list it is for screen readers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "personalize" in self.fields:
            self.fields["personalize"].widget.attrs["aria-label"] = str(
                _("Personalization of %(list)s")
            ) % {"list": self.instance.address}


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

    def get_changelist_form(self, request: HttpRequest, **kwargs: Any) -> type[forms.ModelForm]:
        return super().get_changelist_form(request, form=ListRowForm, **kwargs)

    def get_queryset(self, request: HttpRequest) -> QuerySet[MailingList]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                queued_count=_count(
                    OutgoingMessage, "mailing_list", status=Status.QUEUED, parent=None
                ),
                retrying_count=_count(
                    OutgoingMessage,
                    "mailing_list",
                    status__in=(Status.RETRY, Status.HELD, Status.PAUSED),
                    parent=None,
                ),
                failed_count=_count(
                    OutgoingMessage, "mailing_list", status=Status.FAILED, parent=None
                ),
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
        posts = OutgoingMessage.objects.posts().filter(mailing_list__in=queryset)
        chosen = posts.filter(status__in=OutgoingMessage.WAITING).count()
        _report(self, request, chosen, pause_posts(posts), "paused")

    @admin.action(permissions=["change"], description=_("Resume delivery of their posts"))
    def resume(self, request: HttpRequest, queryset: QuerySet[MailingList]) -> None:
        posts = OutgoingMessage.objects.posts().filter(mailing_list__in=queryset)
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

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        obj = super().get_object(request, object_id, from_field)
        if obj is not None:  # what its page may link to, for this user
            obj.may_see_members = may_view(request, self.admin_site, Member)
        return obj

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
        if not getattr(obj, "may_see_members", False):
            return text % counts
        return format_html(
            '<a href="{}?mailing_list__id__exact={}">{}</a>', url, obj.pk, text % counts
        )

    def get_urls(self):
        view = self.admin_site.admin_view(self.dashboard_view)
        return [path("dashboard/", view, name="listdelivery_dashboard"), *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> TemplateResponse:
        if not dashboard.can_view(request.user):
            return forbidden(request, self.admin_site, _("see the delivery dashboard"))
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
        "last_bounce",
        "created_at",
    )
    list_filter = ("mailing_list", "delivery_status", DisabledFilter)
    search_fields = ("address", "display_name")
    list_select_related = ("mailing_list",)
    autocomplete_fields = ("mailing_list",)
    show_full_result_count = False
    change_list_template = "listdelivery/admin/change_list.html"
    actions = ("enable_delivery", "disable_delivery")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Member]:
        """With the member's latest bounce event: subqueries, never a query per row."""
        latest = BounceEvent.objects.filter(
            mailing_list=OuterRef("mailing_list"), address__iexact=OuterRef("address")
        ).order_by("-created_at", "-id")
        return (
            super()
            .get_queryset(request)
            .annotate(
                last_bounce_code=Subquery(latest.values("smtp_code")[:1]),
                last_bounce_text=Subquery(latest.values("smtp_message")[:1]),
            )
        )

    def _may_see_bounces(self, request: HttpRequest) -> bool:
        return may_view(request, self.admin_site, BounceEvent)

    def get_list_display(self, request: HttpRequest) -> list[str]:
        shown = list(super().get_list_display(request))
        if self._may_see_bounces(request):
            shown.insert(shown.index("last_bounce") + 1, "bounce_events")
        return shown

    def get_readonly_fields(self, request: HttpRequest, obj: Member | None = None) -> list[str]:
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.pk and self._may_see_bounces(request):
            fields.append("bounce_history")
        return fields

    @staticmethod
    def _diagnostic(obj: Member) -> str:
        return f"{obj.last_bounce_code or ''} {obj.last_bounce_text or ''}".strip()

    @admin.display(description=_("last bounce"), ordering="last_bounce_received")
    def last_bounce(self, obj: Member) -> str:
        diagnostic = self._diagnostic(obj)
        if obj.last_bounce_received is None and not diagnostic:
            return "—"
        return format_html(
            '{}<div class="ld-quiet" title="{}">{}</div>',
            obj.last_bounce_received or "",
            diagnostic,
            Truncator(diagnostic).chars(60),
        )

    def _bounces_url(self, obj: Member) -> str:
        url = reverse(f"{self.admin_site.name}:listdelivery_bounceevent_changelist")
        return f"{url}?{urlencode({'address__iexact': obj.address, 'mailing_list__id__exact': obj.mailing_list_id})}"

    @admin.display(description=_("bounce events"))
    def bounce_events(self, obj: Member) -> str:
        if obj.last_bounce_text is None:  # no event at all
            return ""
        return format_html('<a href="{}">{}</a>', self._bounces_url(obj), _("Show events"))

    @admin.display(description=_("bounces"))
    def bounce_history(self, obj: Member) -> str:
        events = BounceEvent.objects.filter(
            mailing_list=obj.mailing_list_id, address__iexact=obj.address
        ).count()
        if not events:
            return _("No bounce events.")
        text = ngettext("%(count)d bounce event", "%(count)d bounce events", events) % {
            "count": events
        }
        return format_html(
            '<a href="{}">{}</a><div>{} {}</div>',
            self._bounces_url(obj),
            text,
            _("Latest:"),
            self._diagnostic(obj),
        )

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
    """The queue, read-only: how far each post has got, and why it waits.

    A post's page tells its story: progress (refreshed while it moves), the
    attempts, the replies of recipients not accepted, the VERP and
    personalization decisions, and Retry / Pause / Resume / Cancel buttons.
    """

    list_display = ("subject_line", "mailing_list", "state", "next_attempt")
    list_display_links = ("subject_line",)
    list_filter = ("status", HealthFilter, ProblemFilter, "mailing_list")
    search_fields = ("message_id", "subject")
    list_select_related = ("mailing_list",)
    show_full_result_count = False
    change_list_template = "listdelivery/admin/change_list.html"
    change_form_template = "listdelivery/admin/post_change_form.html"
    actions = ("retry_now", "pause", "resume", "discard")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "status",
                    "list_link",
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
                )
            },
        ),
        (_("Message"), {"fields": ("headers", "body")}),
    )
    readonly_fields = flatten_fieldsets(fieldsets)

    def get_queryset(self, request: HttpRequest) -> QuerySet[OutgoingMessage]:
        return super().get_queryset(request).posts().defer("message")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Change permission is what the actions need; a post itself is never edited.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a record of what was sent: cancel a post, never delete it

    # -- the change list: counters on the row, never a query per row

    @admin.display(description=_("subject"), ordering="subject")
    def subject_line(self, obj: OutgoingMessage) -> str:
        subject = obj.subject or str(_("(no subject)"))
        return format_html(
            '<span title="{}">{}</span><div class="ld-quiet">{}</div>',
            subject,
            Truncator(subject).chars(60),
            Truncator(obj.message_id).chars(40),
        )

    @admin.display(description=_("status"), ordering="status")
    def state(self, obj: OutgoingMessage) -> str:
        """Status, progress and counts, then the last error shortened (all of it on hover)."""
        state = post_state(obj)
        error = ""
        if obj.last_error and obj.status != Status.DELIVERED:
            error = format_html(
                '<div class="ld-error" title="{}">{}</div>',
                obj.last_error,
                Truncator(obj.last_error).chars(70),
            )
        return format_html(
            '<div class="ld-state ld-{}" title="{}">{}</div>{}<div class="ld-quiet">{}</div>{}',
            state,
            obj.last_error if obj.status == Status.HELD else "",
            status_text(obj, state),
            progress_bar(obj),
            counts_text(obj),
            error,
        )

    @admin.display(description=_("next attempt"), ordering="next_attempt_at")
    def next_attempt(self, obj: OutgoingMessage) -> Any:
        """When it is tried next, until when, and how many attempts so far."""
        if obj.next_attempt_at is None and obj.status == Status.HELD:
            when = _("when an administrator retries it")
        elif obj.status not in (Status.QUEUED, Status.RETRY, Status.HELD):
            when = "—"
        else:
            when = moment(obj.next_attempt_at)
        notes = [ngettext("%d attempt", "%d attempts", obj.attempts) % obj.attempts]
        if obj.deliver_until is not None and obj.status in OutgoingMessage.WAITING:
            notes.append(_("gives up after %s") % moment(obj.deliver_until))
        return format_html(
            '{}<div class="ld-quiet">{}</div>',
            when,
            format_html_join(" · ", "{}", ((note,) for note in notes)),
        )

    # -- the post's page

    @admin.display(description=_("header fields"))
    def headers(self, obj: OutgoingMessage) -> str:
        rows = ((name, _header_text(value)) for name, value in self._parsed(obj).items())
        return format_html(
            '<div class="ld-scroll"><table>{}</table></div>',
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

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        obj = super().get_object(request, object_id, from_field)
        if obj is not None:  # what its page may link to, for this user
            obj.may_see_list = may_view(request, self.admin_site, MailingList)
        return obj

    @admin.display(description=_("list"))
    def list_link(self, obj: OutgoingMessage) -> str:
        if obj.mailing_list is None:
            return _("%(list_id)s (deleted)") % {"list_id": obj.list_id}
        if not getattr(obj, "may_see_list", False):
            return str(obj.mailing_list)
        url = reverse(
            f"{self.admin_site.name}:listdelivery_mailinglist_change",
            args=[quote(obj.mailing_list_id)],
        )
        return format_html('<a href="{}">{}</a>', url, obj.mailing_list)

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: OutgoingMessage | None = None,
    ) -> HttpResponse:
        if obj is not None:
            pieces = list(obj.shards.order_by("id")) if obj.shard_count else []
            number = {piece.pk: index for index, piece in enumerate(pieces, 1)}
            attempts = list(
                DeliveryAttempt.objects.filter(Q(message=obj) | Q(message__parent=obj)).order_by(
                    "started_at", "id"
                )
            )
            for attempt in attempts:
                took = (attempt.finished_at - attempt.started_at).total_seconds()
                attempt.took = dashboard.human_duration(timedelta(seconds=round(took, 1)))
                attempt.shard = number.get(attempt.message_id)
            story = self.progress_context(request, obj, attempts)
            if pieces:
                tried = sum(piece.attempts for piece in pieces)
                running = sum(piece.status == Status.SENDING for piece in pieces)
            else:
                tried, running = obj.attempts, story["state"] in ("sending", "stopping")
            context.update(
                story,
                shard_rows=pieces,
                shard_size=_config()["SHARD_SIZE"],
                attempt_rows=attempts,
                unrecorded=max(tried - len(attempts) - running, 0),
                refusals=refusal_groups(obj),
                refusal_limit=REFUSAL_GROUPS,
                verp=verp_decision(obj),
                personalization=personalization_decision(obj),
                progress_url=self._url("progress", obj),
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def progress_context(
        self,
        request: HttpRequest,
        post: OutgoingMessage,
        attempts: list[DeliveryAttempt] | None = None,
    ) -> dict[str, Any]:
        """What the progress block shows: the same on the page and in its polled fragment."""
        state = post_state(post)
        if runner_finishing(post, attempts):
            state = "stopping"
        due = post.status in (Status.QUEUED, Status.RETRY, Status.HELD) and (
            post.next_attempt_at is not None and post.next_attempt_at <= timezone.now()
        )
        buttons = []
        if self.has_change_permission(request):
            offered = {
                "retry": post.status in RETRYABLE and not post.is_scheduled,
                "pause": post.status in OutgoingMessage.WAITING,
                "resume": post.status == Status.PAUSED,
                "cancel": post.status in (*OutgoingMessage.WAITING, Status.PAUSED),
            }
            labels = {
                "retry": _("Retry now"),
                "pause": _("Pause"),
                "resume": _("Resume"),
                "cancel": _("Cancel delivery…"),
            }
            buttons = [
                {"name": name, "label": labels[name], "url": self._url(name, post)}
                for name, shown in offered.items()
                if shown
            ]
        return {
            "post": post,
            "state": state,
            "live": state in MOVING or due,
            "status_text": status_text(post, state),
            "counts_text": counts_text(post),
            "bar": progress_bar(post),
            "sending_since": moment(post.sending_since) if post.sending_since else "",
            "checkpoint": moment(post.updated_at),
            "remedy": rules.PROBLEMS.get(post.problem, ""),
            "buttons": buttons,
        }

    def _url(self, name: str, post: OutgoingMessage) -> str:
        return reverse(
            f"{self.admin_site.name}:listdelivery_outgoingmessage_{name}", args=[quote(post.pk)]
        )

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path(
                "<path:object_id>/progress/",
                view(self.progress_view),
                name="listdelivery_outgoingmessage_progress",
            ),
            *(
                path(
                    f"<path:object_id>/{name}/",
                    view(self.button_view),
                    {"button": name},
                    name=f"listdelivery_outgoingmessage_{name}",
                )
                for name in BUTTONS
            ),
            *super().get_urls(),
        ]

    def progress_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The progress block alone, which the post's page fetches every 2 s while it moves."""
        if not self.has_view_permission(request):
            return forbidden(request, self.admin_site, _("see the outgoing messages"))
        post = self.get_object(request, unquote(object_id))
        if post is None:
            raise Http404
        context = self.progress_context(request, post)
        return TemplateResponse(request, "listdelivery/admin/post_progress.html", context)

    def button_view(self, request: HttpRequest, object_id: str, button: str) -> HttpResponse:
        """A button on the post's page: the action of the same name on this one post."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_change_permission(request):
            return forbidden(request, self.admin_site, _("change the delivery of posts"))
        post = self.get_object(request, unquote(object_id))
        if post is None:
            raise Http404
        page = reverse(
            f"{self.admin_site.name}:listdelivery_outgoingmessage_change", args=[quote(post.pk)]
        )
        action = getattr(self, BUTTONS[button])
        response = action(request, OutgoingMessage.objects.filter(pk=post.pk))
        if response is not None:  # Cancel asks first; its answer comes back here
            response.context_data["back_url"] = page
            return response
        return HttpResponseRedirect(page)

    # -- the actions (scripts use their names)

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
