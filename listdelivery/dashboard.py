"""What the delivery dashboard in the admin shows: settings, the queue, counters, a chart.

Each function is one small read of the database (one aggregate query at
most), so the page costs the same with ten posts or ten thousand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.conf import settings
from django.db.models import Count, Min, Q
from django.db.models.functions import TruncDate, TruncHour
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from . import conf
from .models import MailingList, OutgoingMessage, OutgoingRecipient

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status

MASK = "••••••"
VERP_KEYS = (
    "VERP_FORMAT",
    "VERP_DELIMITER",
    "VERP_PERSONALIZED_DELIVERIES",
    "VERP_DELIVERY_INTERVAL",
)


def can_view(user: Any) -> bool:
    """Whoever may see the lists or the queue may see the dashboard."""
    return any(
        user.has_perm(f"listdelivery.{action}_{model}")
        for model in ("mailinglist", "outgoingmessage")
        for action in ("view", "change")
    )


# -- settings -----------------------------------------------------------------


@dataclass
class SettingRow:
    key: str
    value: str
    source: str
    problem: str = ""


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
        elif problem:
            shown = str(value)
        else:
            shown = display_value(value)
        rows.append(SettingRow(key, shown, str(source), problem))
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


# -- the queue and the counters ----------------------------------------------------


def retry_queue() -> dict[str, Any]:
    """Waiting and paused posts by list (queued, retrying, held, paused, oldest, next due)."""
    by_list = list(
        OutgoingMessage.objects.filter(status__in=(*OutgoingMessage.WAITING, Status.PAUSED))
        .values("list_id", "mailing_list")
        .annotate(
            total=Count("pk"),
            queued=Count("pk", filter=Q(status=Status.QUEUED)),
            retrying=Count("pk", filter=Q(status=Status.RETRY)),
            held=Count("pk", filter=Q(status=Status.HELD)),
            paused=Count("pk", filter=Q(status=Status.PAUSED)),
            oldest=Min("created_at"),
            next_due=Min("next_attempt_at"),
        )
        .order_by("list_id")
    )
    totals = {
        name: sum(row[name] for row in by_list)
        for name in ("total", "queued", "retrying", "held", "paused")
    }
    totals["oldest"] = min((row["oldest"] for row in by_list), default=None)
    totals["next_due"] = min((row["next_due"] for row in by_list), default=None)
    return {"by_list": by_list, "totals": totals}


def post_counters() -> list[MailingList]:
    return list(
        MailingList.objects.only(
            "address", "display_name", "personalize", "post_id", "last_post_at"
        ).order_by("address")
    )


# -- the chart ------------------------------------------------------------------


@dataclass
class Bar:
    label: str
    sent: int
    failed: int
    x: str = ""
    width: str = ""
    failed_x: str = ""
    sent_y: str = ""
    sent_height: str = ""
    failed_y: str = ""
    failed_height: str = ""
    label_x: str = ""
    show_label: bool = False


@dataclass
class Chart:
    slug: str
    title: str
    bars: list[Bar]
    peak: int = 0
    sent: int = 0
    failed: int = 0
    width: int = 720
    height: int = 200
    left: int = 44
    top: int = 12
    bottom: int = 28
    gridlines: list[tuple[str, str]] = field(default_factory=list)

    @property
    def plot_bottom(self) -> int:
        return self.height - self.bottom

    @property
    def plot_right(self) -> int:
        return self.width - 8

    @property
    def axis_x(self) -> int:
        return self.left - 6

    @property
    def label_y(self) -> int:
        return self.height - 8


SENT = Q(status=RStatus.SENT)
FAILED = Q(status__in=(RStatus.BOUNCED, RStatus.FAILED))


def _activity(trunc: Callable[[str], Any], since: datetime) -> dict[Any, tuple[int, int]]:
    """``{bucket: (accepted, failed)}`` for recipients finished since ``since``: one query."""
    rows = (
        OutgoingRecipient.objects.filter(finished_at__gte=since)
        .annotate(bucket=trunc("finished_at"))
        .values("bucket")
        .annotate(sent=Count("pk", filter=SENT), failed=Count("pk", filter=FAILED))
        .order_by("bucket")
    )
    return {_key(row["bucket"]): (row["sent"], row["failed"]) for row in rows}


def _key(bucket: date | datetime) -> date | datetime:
    return bucket.astimezone(dt_timezone.utc) if isinstance(bucket, datetime) else bucket


def last_24_hours(now: datetime | None = None) -> Chart:
    now = timezone.localtime(now)
    first = now.replace(minute=0, second=0, microsecond=0).astimezone(dt_timezone.utc)
    first -= timedelta(hours=23)
    hours = [first + timedelta(hours=i) for i in range(24)]
    counts = _activity(TruncHour, first)
    bars = [
        Bar(date_format(timezone.localtime(hour), "H:i"), *counts.get(hour, (0, 0)))
        for hour in hours
    ]
    return _layout(Chart("hours", str(_("Last 24 hours, by hour")), bars), label_every=6)


def last_30_days(now: datetime | None = None) -> Chart:
    today = timezone.localdate(now)
    days = [today - timedelta(days=29 - i) for i in range(30)]
    since = timezone.make_aware(datetime.combine(days[0], time.min))
    counts = _activity(TruncDate, since)
    bars = [Bar(date_format(day, "M j"), *counts.get(day, (0, 0))) for day in days]
    return _layout(Chart("days", str(_("Last 30 days, by day")), bars), label_every=5)


def _layout(chart: Chart, label_every: int) -> Chart:
    """Place the bars: two side by side per bucket, scaled to the busiest series."""
    bars = chart.bars
    chart.sent = sum(bar.sent for bar in bars)
    chart.failed = sum(bar.failed for bar in bars)
    chart.peak = max((max(bar.sent, bar.failed) for bar in bars), default=0)
    scale = max(chart.peak, 1)
    plot_width = chart.plot_right - chart.left
    plot_height = chart.plot_bottom - chart.top
    slot = plot_width / len(bars)
    for i, bar in enumerate(bars):
        x = chart.left + i * slot + slot * 0.1
        sent_height = bar.sent / scale * plot_height
        failed_height = bar.failed / scale * plot_height
        bar.x, bar.width, bar.failed_x = _n(x), _n(slot * 0.4), _n(x + slot * 0.4)
        bar.sent_height, bar.sent_y = _n(sent_height), _n(chart.plot_bottom - sent_height)
        bar.failed_height, bar.failed_y = _n(failed_height), _n(chart.plot_bottom - failed_height)
        bar.label_x = _n(chart.left + (i + 0.5) * slot)
        bar.show_label = (len(bars) - 1 - i) % label_every == 0
    chart.gridlines = [
        (_n(chart.top), str(chart.peak) if chart.peak else ""),
        (_n(chart.top + plot_height / 2), f"{chart.peak / 2:g}" if chart.peak else ""),
        (_n(chart.plot_bottom), "0"),
    ]
    return chart


def _n(number: float) -> str:
    """A coordinate for SVG: a dot for decimals whatever the language."""
    return f"{number:.1f}"


def context(now: datetime | None = None) -> dict[str, Any]:
    """Everything the dashboard template shows."""
    rows = setting_rows()
    return {
        "verp_settings": _ordered(rows, VERP_KEYS),
        "delivery_settings": [row for row in rows if row.key not in VERP_KEYS],
        "queue": retry_queue(),
        "counters": post_counters(),
        "charts": [last_24_hours(now), last_30_days(now)],
    }


def _ordered(rows: Iterable[SettingRow], keys: tuple[str, ...]) -> list[SettingRow]:
    found = {row.key: row for row in rows}
    return [found[key] for key in keys]
