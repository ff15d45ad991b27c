"""What the delivery dashboard in the admin shows: posts being sent, the queue, charts, settings.

Each section is one query at most (the charts read the hourly totals of
:class:`~listdelivery.models.DeliveryHour`, never the recipients), so the page
costs the same few queries with ten posts or ten million recipients. The
relays and destination groups are read from the shared limits store with the
health facts: a few queries each in the database store, so their number is
set by the settings (how many relays and groups), never by the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from datetime import timezone as dt_timezone
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.db.models import Count, F, Min, Q, Sum
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format, number_format
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from . import conf, health, relays
from .models import DeliveryHour, MailingList, OutgoingMessage
from .rates import Rate
from .redact import without_url_passwords

Status = OutgoingMessage.Status

MASK = "••••••"
VERP_KEYS = (
    "VERP_FORMAT",
    "VERP_DELIMITER",
    "VERP_PERSONALIZED_DELIVERIES",
    "VERP_DELIVERY_INTERVAL",
)
#: Posts listed under "Sending now"; the section says how many more there are.
SENDING_ROWS = 20


def can_view(user: Any) -> bool:
    """Whoever may see the lists or the queue may see the dashboard."""
    return may_open(user, "mailinglist") or may_open(user, "outgoingmessage")


def may_open(user: Any, model: str) -> bool:
    """May ``user`` open the admin pages of ``model`` (view or change permission)?"""
    return user.has_perm(f"listdelivery.view_{model}") or user.has_perm(
        f"listdelivery.change_{model}"
    )


# -- settings -----------------------------------------------------------------


@dataclass
class SettingRow:
    key: str
    value: str
    source: str
    problem: str = ""
    description: str = ""


def setting_rows() -> list[SettingRow]:
    """Every setting with its effective value, shown for people, and where it came from."""
    written = conf.user_settings()
    from_environment = keys_from_environment()
    rows = []
    for key, default in conf.DEFAULTS.items():
        if key in from_environment:
            source = _("environment")
        elif key in written:
            source = _("settings")
        else:
            source = _("default")
        value, problem = written.get(key, default), ""
        try:
            value = conf.normalize(key, value)
        except ValueError as error:
            problem = conf._describe(key, error)
        if key in conf.SECRET_KEYS:
            shown = MASK if value else str(_("(not set)"))
        elif key == "RELAYS":  # names, hosts and limits: never a relay's password
            shown = relays.describe_setting(written.get(key, default))
        elif problem and key in conf.STRUCTURED_KEYS:
            shown = str(_("(cannot be used)"))
        elif problem:
            shown = str(value)
        else:
            shown = display_value(value)
        description = conf.DESCRIPTIONS.get(key, "")
        # A redis:// URL (RATE_LIMIT_STORAGE) may carry a password.
        shown, problem = without_url_passwords(shown), without_url_passwords(problem)
        rows.append(SettingRow(key, shown, str(source), problem, description))
    return rows


def keys_from_environment() -> set[str]:
    """Keys whose value came from an environment variable.

    ``listdelivery_from_environment()`` marks them on the dict it returns; a site that reads
    its environment itself may list them in ``LISTDELIVERY_FROM_ENVIRONMENT``.
    """
    marked = getattr(getattr(settings, "LISTDELIVERY", None), "from_environment", ())
    return set(marked) | set(getattr(settings, "LISTDELIVERY_FROM_ENVIRONMENT", ()))


def display_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(_("yes") if value else _("no"))
    if isinstance(value, timedelta):
        return human_duration(value)
    if value == "":
        return str(_("(empty)"))
    return str(value)


def human_duration(value: timedelta) -> str:
    """``5 days``, ``1 hour, 30 minutes``, ``90.5 seconds`` → ``1 minute, 30.5 seconds``."""
    seconds = value.total_seconds()
    parts = []
    for size, singular, plural in (
        (86400, "%(n)d day", "%(n)d days"),
        (3600, "%(n)d hour", "%(n)d hours"),
        (60, "%(n)d minute", "%(n)d minutes"),
    ):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(ngettext(singular, plural, int(count)) % {"n": count})
    if seconds or not parts:
        plural = math.ceil(seconds)  # 1.5 seconds takes the plural
        parts.append(ngettext("%(n)s second", "%(n)s seconds", plural) % {"n": f"{seconds:g}"})
    return ", ".join(parts)


# -- the queue, the posts being sent, the counters ------------------------------------

#: The queue table's columns: (count name, status it filters the change list on, heading).
QUEUE_COLUMNS = (
    ("queued", Status.QUEUED, _("Queued")),
    ("sending", Status.SENDING, _("Sending")),
    ("retrying", Status.RETRY, _("Retrying")),
    ("held", Status.HELD, _("Held")),
    ("paused", Status.PAUSED, _("Paused")),
)


def retry_queue(posts_url: str = "") -> dict[str, Any]:
    """Waiting, sending and paused posts by list: counts, oldest, next due. One query.

    With ``posts_url`` (the queue's change list, for a user who may open it) every
    count gets the link to the posts it counts: ``cells`` is ``[(count, url), …]``
    in the order of :data:`QUEUE_COLUMNS`.
    """
    by_list = list(
        OutgoingMessage.objects.posts()
        .filter(status__in=(*OutgoingMessage.WAITING, Status.PAUSED))
        .values("list_id", "mailing_list")
        .annotate(
            total=Count("pk"),
            **{
                name: Count("pk", filter=Q(status=status))
                for name, status, _heading in QUEUE_COLUMNS
            },
            oldest=Min("created_at"),
            next_due=Min("next_attempt_at"),
        )
        .order_by("list_id")
    )
    totals: dict[str, Any] = {
        name: sum(row[name] for row in by_list)
        for name in ("total", *(name for name, _status, _heading in QUEUE_COLUMNS))
    }
    totals["oldest"] = min((row["oldest"] for row in by_list), default=None)
    totals["next_due"] = min((row["next_due"] for row in by_list), default=None)
    for row in by_list:
        # A post whose list was deleted keeps its list ID; the change list filters on it.
        where = (
            {"mailing_list__id__exact": row["mailing_list"]}
            if row["mailing_list"]
            else {"list_id__exact": row["list_id"]}
        )
        row["cells"] = _cells(row, posts_url, where)
    totals["cells"] = _cells(totals, posts_url, {})
    return {"by_list": by_list, "totals": totals}


def _cells(counts: dict[str, Any], posts_url: str, where: dict[str, Any]) -> list[tuple[int, str]]:
    return [
        (
            counts[name],
            f"{posts_url}?{urlencode({'status__exact': status, **where})}"
            if posts_url and counts[name]
            else "",
        )
        for name, status, _heading in QUEUE_COLUMNS
    ]


def sending_now(limit: int = SENDING_ROWS) -> list[OutgoingMessage]:
    """The posts runners are delivering right now, longest-running first: one query."""
    return list(
        OutgoingMessage.objects.posts()
        .filter(status=Status.SENDING)
        .only(
            "list_id",
            "subject",
            "message_id",
            "status",
            "recipient_count",
            "sent_count",
            "deferred_count",
            "bounced_count",
            "failed_count",
            "sending_since",
            "rate",
            "finish_estimate",
            "leased_until",
            "updated_at",
        )
        .order_by(F("sending_since").asc(nulls_last=True), "pk")[:limit]
    )


def post_counters() -> list[MailingList]:
    return list(
        MailingList.objects.only(
            "address", "list_id", "display_name", "personalize", "post_id", "last_post_at"
        ).order_by("address")
    )


# -- relays and destination groups ----------------------------------------------------


@dataclass
class LimitRow:
    """One relay or destination group as the dashboard shows it."""

    kind: str  # "relay" or "destination"
    name: str
    limits: str
    rate_now: str  # "150/s of 300/s"; "" without a rate
    slowed: bool  # the server asked for less than the configured rate
    sessions: str  # "1 of 2"; "" without a cap
    resting_until: datetime | None
    throttled_until: datetime | None
    quota: str  # "820 / 1,000"; "" without a quota


def limit_rows(limits: Iterable[health.SendingLimit]) -> list[LimitRow]:
    rows = []
    for limit in limits:
        rate_now, slowed = "", False
        if limit.rate is not None and limit.learned_rate is not None:
            rate_now = learned_text(limit.learned_rate, limit.rate)
            slowed = limit.learned_rate < limit.rate.per_second * 0.999
        sessions = ""
        if limit.connections:
            sessions = str(_("%(open)s of %(cap)s")) % {
                "open": limit.sessions or 0,
                "cap": limit.connections,
            }
        quota = ""
        if limit.quota:
            quota = f"{_whole(limit.quota_used or 0)} / {_whole(limit.quota)}"
        rows.append(
            LimitRow(
                kind=limit.kind,
                name=limit.name,
                limits=limit.limits,
                rate_now=rate_now,
                slowed=slowed,
                sessions=sessions,
                resting_until=limit.resting_until,
                throttled_until=limit.throttled_until,
                quota=quota,
            )
        )
    return rows


def learned_text(per_second: float, rate: Rate) -> str:
    """The learned rate in the configured rate's own period: ``150/s of 300/s``, ``500/h of 1000/h``."""
    period = str(rate).partition("/")[2]
    now = per_second * rate.per
    shown = _whole(round(now)) if now >= 10 else f"{now:.1f}".removesuffix(".0")
    return str(_("%(now)s of %(rate)s")) % {
        "now": f"{shown}/{period}",
        "rate": f"{_whole(rate.count)}/{period}",
    }


def _whole(value: int) -> str:
    return number_format(value, force_grouping=True)


def one_server() -> str:
    """``host:port`` of the only SMTP server, when no traffic shaping is configured."""
    written = {**conf.DEFAULTS, **conf.user_settings()}
    return f"{written['SMTP_HOST']}:{written['SMTP_PORT']}"


# -- the charts -----------------------------------------------------------------


@dataclass
class Bar:
    label: str
    sent: int
    failed: int  # refused (bounced) or failed
    x: str = ""
    width: str = ""
    sent_y: str = ""
    sent_height: str = ""
    failed_y: str = ""
    failed_height: str = ""
    label_x: str = ""
    show_label: bool = False


@dataclass
class Panel:
    """One band of the chart with its own vertical scale: accepted, or refused and failed."""

    top: int
    bottom: int
    peak: int = 0
    top_value: int = 1  # the value at the top gridline
    gridlines: list[tuple[str, str]] = field(default_factory=list)  # (y, label)

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def label_y(self) -> int:
        return self.top - 6

    def scale(self, peak: int, lines: int) -> None:
        values = nice_axis(peak, lines)
        self.peak, self.top_value = peak, max(values[-1], 1)
        self.gridlines = [
            (_n(self.bottom - self.bar_height(value)), short_number(value)) for value in values
        ]

    def bar_height(self, value: int) -> float:
        """Height of a bar on this panel's axis; never invisible when the value is not zero."""
        height = value / self.top_value * self.height
        return max(height, MIN_BAR_HEIGHT) if value else 0.0


MIN_BAR_HEIGHT = 2.0  # pixels of the 720-wide view box: a single failure stays visible


@dataclass
class Chart:
    slug: str
    title: str
    empty_text: str
    bars: list[Bar]
    sent: int = 0
    failed: int = 0
    width: int = 720
    height: int = 250
    left: int = 48
    right: int = 8
    accepted: Panel = field(default_factory=lambda: Panel(top=18, bottom=150))
    refused: Panel = field(default_factory=lambda: Panel(top=178, bottom=222))

    @property
    def plot_right(self) -> int:
        return self.width - self.right

    @property
    def axis_x(self) -> int:
        return self.left - 6

    @property
    def label_y(self) -> int:
        return self.height - 8

    @property
    def empty(self) -> bool:
        return not (self.sent or self.failed)

    @property
    def panels(self) -> list[tuple[Panel, str]]:
        return [(self.accepted, str(_("accepted"))), (self.refused, str(_("refused or failed")))]


def nice_axis(peak: int, lines: int) -> list[int]:
    """Gridline values from 0 to at least ``peak`` in whole steps of 1, 2 or 5 × 10ⁿ.

    About ``lines`` steps: 20,000 in 4 gives 0, 5k, 10k, 15k, 20k; 3 gives 0, 1, 2, 3.
    """
    if peak <= 0:
        return [0]
    raw = max(peak / lines, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    top = math.ceil(peak / step) * step
    return list(range(0, top + 1, step))


def short_number(value: int) -> str:
    """An axis label: ``950``, ``10k``, ``1.5M``."""
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if value >= size:
            return f"{value / size:.1f}".removesuffix(".0") + suffix
    return str(value)


def hourly_totals(since: datetime, list_id: str = "") -> dict[datetime, tuple[int, int]]:
    """``{UTC hour: (accepted, refused or failed)}`` from ``since`` on, for one list or all.

    One query over at most 24 × 31 rows per list (the hourly totals, never the recipients).
    """
    rows = DeliveryHour.objects.filter(hour__gte=since)
    if list_id:
        rows = rows.filter(list_id=list_id)
    summed = (
        rows.values("hour")
        .annotate(sent_sum=Sum("sent"), failed_sum=Sum("bounced") + Sum("failed"))
        .order_by("hour")
    )
    return {
        row["hour"].astimezone(dt_timezone.utc): (row["sent_sum"], row["failed_sum"])
        for row in summed
    }


def charts(now: datetime | None = None, list_id: str = "") -> list[Chart]:
    """The last 24 hours by hour and the last 30 days by local day, from one query."""
    now = timezone.localtime(now)
    this_hour = now.astimezone(dt_timezone.utc).replace(minute=0, second=0, microsecond=0)
    today = now.date()
    first_day = today - timedelta(days=29)
    day_start = timezone.make_aware(datetime.combine(first_day, time.min))
    since = min(
        day_start.astimezone(dt_timezone.utc).replace(minute=0, second=0, microsecond=0),
        this_hour - timedelta(hours=23),
    )
    totals = hourly_totals(since, list_id)
    return [last_24_hours(totals, this_hour), last_30_days(totals, first_day)]


def last_24_hours(totals: dict[datetime, tuple[int, int]], this_hour: datetime) -> Chart:
    hours = [this_hour - timedelta(hours=23 - i) for i in range(24)]
    bars = [
        Bar(date_format(timezone.localtime(hour), "H:i"), *totals.get(hour, (0, 0)))
        for hour in hours
    ]
    chart = Chart(
        "hours",
        str(_("Last 24 hours, by hour")),
        str(_("No deliveries in the last 24 hours.")),
        bars,
    )
    return _layout(chart, label_every=6)


def last_30_days(totals: dict[datetime, tuple[int, int]], first_day: date) -> Chart:
    # An hour's totals count on the local day its UTC hour starts in. Where the offset is
    # not whole hours (India's +5:30, Nepal's +5:45) an hour straddles midnight, so up to
    # 45 minutes of one day's deliveries are counted on the day before; the hourly rows
    # cannot be split more finely than that.
    by_day: dict[date, list[int]] = {}
    for hour, (sent, failed) in totals.items():
        day = timezone.localtime(hour).date()
        counts = by_day.setdefault(day, [0, 0])
        counts[0] += sent
        counts[1] += failed
    days = [first_day + timedelta(days=i) for i in range(30)]
    bars = [Bar(date_format(day, "M j"), *by_day.get(day, (0, 0))) for day in days]
    chart = Chart(
        "days",
        str(_("Last 30 days, by day")),
        str(_("No deliveries in the last 30 days.")),
        bars,
    )
    return _layout(chart, label_every=5)


def _layout(chart: Chart, label_every: int) -> Chart:
    """Place the bars: accepted on the upper panel, refused or failed below, each on its axis.

    The failures have their own scale so that three refusals stay readable next to a
    day of 20,000 accepted recipients; both axes are labelled, and the exact counts are
    in each bar's title and in the table under the chart.
    """
    bars = chart.bars
    chart.sent = sum(bar.sent for bar in bars)
    chart.failed = sum(bar.failed for bar in bars)
    chart.accepted.scale(max((bar.sent for bar in bars), default=0), lines=4)
    chart.refused.scale(max((bar.failed for bar in bars), default=0), lines=2)
    slot = (chart.plot_right - chart.left) / len(bars)
    for i, bar in enumerate(bars):
        x = chart.left + i * slot + slot * 0.15
        sent_height = chart.accepted.bar_height(bar.sent)
        failed_height = chart.refused.bar_height(bar.failed)
        bar.x, bar.width = _n(x), _n(slot * 0.7)
        bar.sent_height, bar.sent_y = _n(sent_height), _n(chart.accepted.bottom - sent_height)
        bar.failed_height = _n(failed_height)
        bar.failed_y = _n(chart.refused.bottom - failed_height)
        bar.label_x = _n(chart.left + (i + 0.5) * slot)
        bar.show_label = (len(bars) - 1 - i) % label_every == 0
    return chart


def _n(number: float) -> str:
    """A coordinate for SVG: a dot for decimals whatever the language."""
    return f"{number:.1f}"


# -- the page ---------------------------------------------------------------------


def context(request: HttpRequest | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Everything the dashboard template shows, for the user of ``request``.

    ``?list=<pk>`` charts one list. Links go only where the user may go: the queue's
    pages with view or change permission on posts, a list's page with it on lists.
    """
    user = request.user if request is not None else None
    may_open_posts = user is not None and may_open(user, "outgoingmessage")
    may_open_lists = user is not None and may_open(user, "mailinglist")
    posts_url = reverse("admin:listdelivery_outgoingmessage_changelist") if may_open_posts else ""
    lists = post_counters()
    chosen = _chosen_list(lists, request.GET.get("list", "") if request is not None else "")
    queue = retry_queue(posts_url)
    rows = setting_rows()
    # The health facts are read here, once, for the banner and the relays section alike.
    facts = health.report().for_user(user) if user is not None and can_view(user) else None
    limits, limits_error = (facts.limits, facts.limits_error) if facts else health.sending_limits()
    return {
        "health": facts,
        "limits": limit_rows(limits),
        "limits_error": limits_error,
        "one_server": "" if limits or limits_error else one_server(),
        "may_open_posts": may_open_posts,
        "may_open_lists": may_open_lists,
        "queue": queue,
        "queue_columns": [heading for _name, _status, heading in QUEUE_COLUMNS],
        "sending": sending_now(),
        "sending_more": max(queue["totals"]["sending"] - SENDING_ROWS, 0),
        "counters": lists,
        "chosen_list": chosen,
        "charts": charts(now, chosen.list_id if chosen else ""),
        "time_zone": timezone.get_current_timezone_name(),
        "verp_settings": _ordered(rows, VERP_KEYS),
        "delivery_settings": [row for row in rows if row.key not in VERP_KEYS],
    }


def _chosen_list(lists: list[MailingList], wanted: str) -> MailingList | None:
    """The list ``?list=`` names, among those already read; None for all lists."""
    return next((mlist for mlist in lists if str(mlist.pk) == wanted), None)


def _ordered(rows: Iterable[SettingRow], keys: tuple[str, ...]) -> list[SettingRow]:
    found = {row.key: row for row in rows}
    return [found[key] for key in keys]
