"""Health at a glance: is delivery running, and does anything need an administrator?

:func:`report` reads the facts from the database in five queries whatever the
size of the queue or of the lists (aggregates over indexed columns), so the
admin banner and the JSON endpoint are right with any number of runners on any
number of machines. :attr:`Health.ok` is what a load balancer or a monitor
reads: it is false when posts wait that no runner picks up, or when posts are
held until an administrator acts.

Whether a django-q2 cluster is alive is read from the sweep Schedule: a
running cluster's scheduler (in its sentinel, about every 30 seconds) moves
the schedule's ``next_run`` forward each time it starts a sweep, so a
``next_run`` minutes in the past means no scheduler serves it. That row is in
the database, so it reads the same with the ORM broker and with Redis, from
the web server or any machine. django-q2's ``Stat`` is not used: it lives 3
seconds in the broker's cache, which for the ORM broker is the site's
``CACHES["default"]`` (per process, so empty, with Django's default
local-memory cache), and reading it costs a broker round trip on every health
check. With ``Q_CLUSTER["catch_up"]`` on (django-q2's default) a cluster that
comes back after a long stop moves ``next_run`` one interval per scheduler
look, so it reads as late until it has caught up; the banner says so.

When traffic shaping is configured (:class:`~listdelivery.shaping.Shaper`),
the report also reads each relay and destination group from the shared
limits store: a few queries each in the database store, bounded by the
settings, not by the data. A relay resting after failures is a warning, and
posts set aside by a sending limit are counted: neither is a failure, unless
every relay rests.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError
from django.db.models import Count, F, Max, Min, Q
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.text import Truncator

from . import conf, rules
from .models import DeliveryStatus, Member, OutgoingMessage, RunnerPass
from .rates import Rate
from .redact import without, without_url_passwords
from .shaping import Shaper
from .tasks import TASK

logger = logging.getLogger(__name__)

Status = OutgoingMessage.Status

#: The sweep's interval when no sweep schedule says otherwise (the one ``migrate`` creates).
DEFAULT_SWEEP = timedelta(minutes=1)
#: How late the sweep's ``next_run`` may be while a scheduler serves it: it looks every
#: 30 seconds, so two minutes is four chances missed.
SCHEDULE_LATE_AFTER = timedelta(minutes=2)
#: Beyond a sweep interval, how long a due post may wait to be picked up: the
#: scheduler's look, then the task's turn in the broker's queue.
OVERDUE_SLACK = timedelta(minutes=1)
#: Kinds of trouble that only an administrator ends (the remedy says "then Retry now").
ADMIN_PROBLEMS = frozenset(rules.PROBLEMS) - {"connection", "server", "limited"}
#: The problem of a post set aside until a sending limit allows it: not trouble.
LIMITED = "limited"
EXAMPLE_CHARS = 300

POSTS_CHANGELIST = "admin:listdelivery_outgoingmessage_changelist"
MEMBERS_CHANGELIST = "admin:listdelivery_member_changelist"
SCHEDULE_CHANGELIST = "admin:django_q_schedule_changelist"
#: Which permission (view or change) opens each link of :attr:`Health.links`.
LINK_MODELS = {
    "due": "listdelivery.%s_outgoingmessage",
    "overdue": "listdelivery.%s_outgoingmessage",
    "stalled": "listdelivery.%s_outgoingmessage",
    "sending": "listdelivery.%s_outgoingmessage",
    "held": "listdelivery.%s_outgoingmessage",
    "needs_admin": "listdelivery.%s_outgoingmessage",
    "problem": "listdelivery.%s_outgoingmessage",
    "limited": "listdelivery.%s_outgoingmessage",
    "members_disabled": "listdelivery.%s_member",
    "schedule": "django_q.%s_schedule",
}


# -- the conditions, shared with the admin's filters --------------------------------


def overdue_q(now: datetime, sweep: timedelta) -> Q:
    """Waiting posts due more than a sweep ago that no live runner holds.

    A ``sending`` post whose lease ran out that long ago counts too: its runner
    died and no other took it over.
    """
    cutoff = now - sweep - OVERDUE_SLACK
    return Q(
        Q(leased_until__isnull=True) | Q(leased_until__lt=cutoff),
        status__in=OutgoingMessage.WAITING,
        next_attempt_at__lt=cutoff,
    )


def due_q(now: datetime) -> Q:
    """Waiting posts whose time has come that no live runner holds."""
    return Q(
        Q(leased_until__isnull=True) | Q(leased_until__lt=now),
        status__in=OutgoingMessage.WAITING,
        next_attempt_at__lte=now,
    )


def stalled_q(now: datetime) -> Q:
    """Sending, but the runner stopped renewing its lease: another takes it over."""
    return Q(status=Status.SENDING) & (Q(leased_until__isnull=True) | Q(leased_until__lt=now))


def needs_admin_q() -> Q:
    """Held until an administrator retries it, or held by trouble only an administrator ends."""
    return Q(status=Status.HELD) & (
        Q(next_attempt_at__isnull=True) | Q(problem__in=sorted(ADMIN_PROBLEMS))
    )


def troubled_q() -> Q:
    """Posts held or delayed by server trouble, or set aside by a sending limit (queued too)."""
    return (
        Q(status=Status.HELD)
        | (Q(status=Status.RETRY) & ~Q(problem=""))
        | Q(status=Status.QUEUED, problem=LIMITED)
    )


def start_of_today(now: datetime) -> datetime:
    """Midnight in the site's time zone."""
    return timezone.make_aware(datetime.combine(timezone.localdate(now), time.min))


# -- the facts ------------------------------------------------------------------------


@dataclass
class LastPass:
    finished_at: datetime
    runner: str
    posts: int
    seconds: float
    age: timedelta


@dataclass
class ProblemGroup:
    """Posts held or delayed by one kind of server trouble."""

    kind: str
    posts: int
    held: int
    awaiting_admin: int  # held with no next attempt: until an administrator retries them
    remedy: str
    example: str  # one post's last error, with the SMTP password masked
    since: datetime | None  # the oldest of them last changed then
    link: str = ""
    next_attempt: datetime | None = None  # the soonest of them is tried again then

    @property
    def needs_admin(self) -> bool:
        return self.awaiting_admin > 0 or (self.held > 0 and self.kind in ADMIN_PROBLEMS)


@dataclass
class SendingLimit:
    """A relay or a destination group as every runner sees it now, in the shared limits store."""

    kind: str  # "relay" or "destination"
    name: str
    limits: str  # for people: the relay's host and limits, the group's rate and domains
    rate: Rate | None  # the rate "slow down" replies lower (the first one configured)
    learned_rate: float | None  # per second now: the full rate until the server asked for less
    sessions: int | None
    connections: int  # the cap on sessions open at once; 0: none
    quota_used: int | None
    quota: int  # recipients a UTC day; 0: none
    throttled_until: datetime | None  # a 421 "come back later" stopped it until then
    resting_until: datetime | None  # a relay that refused connections, TLS or the login

    @property
    def resting(self) -> bool:
        return self.resting_until is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "limits": self.limits,
            "rate_per_second": self.rate.per_second if self.rate else None,
            "learned_rate_per_second": self.learned_rate,
            "sessions": self.sessions,
            "connections": self.connections or None,
            "quota_used": self.quota_used,
            "quota": self.quota or None,
            "throttled_until": _iso(self.throttled_until),
            "resting_until": _iso(self.resting_until),
        }


def sending_limits() -> tuple[list[SendingLimit], str]:
    """Each relay and destination group when traffic is shaped, else none; and a read error.

    A few queries per relay and group with the database store: bounded by the
    settings (how many relays and groups there are), never by the data.
    """
    try:
        shaper = Shaper(conf.get_config())
    except ImproperlyConfigured:  # the dashboard's settings table says what is wrong
        return [], ""
    if not shaper.active:
        return [], ""
    try:
        rows = shaper.snapshot()
    except DatabaseError:
        raise
    except Exception as error:  # Redis may be down: the health check must still answer
        text = without_url_passwords(f"{type(error).__name__}: {error}")
        logger.warning("Could not read the sending limits: %s", text)
        return [], text
    relays = {relay.name: relay for relay in shaper.relays}
    groups = {group.name: group for group in shaper.router.groups}
    found = []
    for row in rows:
        if row["kind"] == "relay":
            relay = relays[row["name"]]
            rates, connections = relay.rates, relay.connections
            limits = relay.describe().removeprefix(f"{relay.name} (").removesuffix(")")
        else:
            rates, connections, limits = groups[row["name"]].rates, 0, row["limits"]
        rate = rates[0] if rates else None
        learned = row["learned_rate"]
        if learned is None and rate is not None:  # not used yet: nothing learned
            learned = rate.per_second
        found.append(
            SendingLimit(
                kind=row["kind"],
                name=row["name"],
                limits=limits,
                rate=rate,
                learned_rate=learned,
                sessions=row["sessions"],
                connections=connections,
                quota_used=row["quota_used"],
                quota=row["quota"] or 0,
                throttled_until=row["throttled_until"],
                resting_until=row["resting_until"],
            )
        )
    return found, ""


@dataclass
class Health:
    checked_at: datetime
    last_pass: LastPass | None
    pass_stale: bool  # no pass for longer than a runner leaves between two
    cluster: str  # "running", "late", "no_schedule" or "not_installed"
    sweep_interval: timedelta
    sweep_next_run: datetime | None
    catch_up: bool  # django-q2 runs missed sweeps one by one after a stop
    due: int  # due now and held by no live runner
    overdue: int
    oldest_overdue: datetime | None
    sending: int
    stalled: int
    held: int
    needs_admin: int
    problems: list[ProblemGroup]
    members_disabled_today: int
    limited: int = 0  # posts set aside until a sending limit allows them
    limited_until: datetime | None = None  # the soonest of them goes on then
    limits: list[SendingLimit] = field(default_factory=list)
    limits_error: str = ""  # why the shared limits could not be read
    #: Admin change lists filtered to each fact; "" where the user may not open it.
    links: dict[str, str] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        """Why delivery is not healthy: ``no_pass``, ``overdue``, ``needs_admin``, ``relays_resting``.

        One relay resting is not a reason: the others take its traffic. All of them is.
        """
        reasons = []
        if self.pass_stale and (self.due or self.overdue):
            reasons.append("no_pass")
        if self.overdue:
            reasons.append("overdue")
        if self.needs_admin:
            reasons.append("needs_admin")
        if self.relays and all(relay.resting for relay in self.relays):
            reasons.append("relays_resting")
        return reasons

    @property
    def relays(self) -> list[SendingLimit]:
        return [limit for limit in self.limits if limit.kind == "relay"]

    @property
    def resting_relays(self) -> list[SendingLimit]:
        return [relay for relay in self.relays if relay.resting]

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def cluster_running(self) -> bool:
        return self.cluster == "running"

    def for_user(self, user: Any) -> Health:
        """The same facts, with only the links ``user`` may open."""
        allowed = {name for name, perm in LINK_MODELS.items() if _may_view(user, perm)}
        links = {name: url if name in allowed else "" for name, url in self.links.items()}
        problems = [
            dataclasses.replace(group, link=group.link if "problem" in allowed else "")
            for group in self.problems
        ]
        return dataclasses.replace(self, links=links, problems=problems)

    def as_dict(self, detail: bool = False) -> dict[str, Any]:
        """JSON-safe facts: counts and times; with ``detail``, runner names, errors, remedies.

        Without ``detail`` nothing names a host, a list, an address or a server reply.
        """
        data: dict[str, Any] = {
            "ok": self.ok,
            "reasons": self.reasons,
            "checked_at": _iso(self.checked_at),
            "last_pass": None,
            "cluster": self.cluster,
            "sweep_next_run": _iso(self.sweep_next_run),
            "sweep_interval_seconds": self.sweep_interval.total_seconds(),
            "posts": {
                "due": self.due,
                "overdue": self.overdue,
                "oldest_overdue": _iso(self.oldest_overdue),
                "sending": self.sending,
                "stalled": self.stalled,
                "held": self.held,
                "needs_admin": self.needs_admin,
                "limited": self.limited,
                "limited_until": _iso(self.limited_until),
            },
            "members_disabled_by_bounces_today": self.members_disabled_today,
            "relays": {"total": len(self.relays), "resting": len(self.resting_relays)},
        }
        if self.last_pass:
            data["last_pass"] = {
                "finished_at": _iso(self.last_pass.finished_at),
                "age_seconds": round(self.last_pass.age.total_seconds(), 1),
                "posts": self.last_pass.posts,
                "seconds": round(self.last_pass.seconds, 3),
            }
        if detail:
            if self.last_pass:
                data["last_pass"]["runner"] = self.last_pass.runner
            data["problems"] = [
                {
                    "kind": group.kind,
                    "posts": group.posts,
                    "held": group.held,
                    "awaiting_admin": group.awaiting_admin,
                    "needs_admin": group.needs_admin,
                    "remedy": group.remedy,
                    "example": group.example,
                    "since": _iso(group.since),
                }
                for group in self.problems
            ]
            data["limits"] = [limit.as_dict() for limit in self.limits]
            data["limits_error"] = self.limits_error
            data["links"] = {name: url for name, url in self.links.items() if url}
        return data


def report(now: datetime | None = None) -> Health:
    """The facts, as of ``now``: five queries whatever the table sizes.

    With traffic shaping configured, add the limits store's few per relay and group.
    """
    now = now or timezone.now()
    last_pass = _last_pass(now)
    cluster, interval, next_run, catch_up = sweep_state(now)
    posts = (
        OutgoingMessage.objects.posts()
        .filter(status__in=OutgoingMessage.WAITING)
        .aggregate(
            due=Count("pk", filter=due_q(now)),
            overdue=Count("pk", filter=overdue_q(now, interval)),
            oldest_overdue=Min("next_attempt_at", filter=overdue_q(now, interval)),
            sending=Count("pk", filter=Q(status=Status.SENDING)),
            stalled=Count("pk", filter=stalled_q(now)),
            held=Count("pk", filter=Q(status=Status.HELD)),
            needs_admin=Count("pk", filter=needs_admin_q()),
        )
    )
    disabled = Member.objects.filter(
        delivery_status=DeliveryStatus.BY_BOUNCES, disabled_at__gte=start_of_today(now)
    ).count()
    stale_after = 3 * interval + SCHEDULE_LATE_AFTER
    problems = _problems()
    limited = next((group for group in problems if group.kind == LIMITED), None)
    limits, limits_error = sending_limits()
    return Health(
        checked_at=now,
        last_pass=last_pass,
        pass_stale=last_pass is None or last_pass.age > stale_after,
        cluster=cluster,
        sweep_interval=interval,
        sweep_next_run=next_run,
        catch_up=catch_up,
        problems=[group for group in problems if group is not limited],
        members_disabled_today=disabled,
        limited=limited.posts if limited else 0,
        limited_until=limited.next_attempt if limited else None,
        limits=limits,
        limits_error=limits_error,
        links=_links(cluster),
        **posts,
    )


def _last_pass(now: datetime) -> LastPass | None:
    row = RunnerPass.objects.filter(pk=1).first()
    if row is None:
        return None
    return LastPass(row.finished_at, row.runner, row.posts, row.seconds, now - row.finished_at)


def sweep_state(now: datetime) -> tuple[str, timedelta, datetime | None, bool]:
    """The cluster's state, the sweep's interval and next run, and django-q2's ``catch_up``."""
    if not apps.is_installed("django_q"):
        return "not_installed", DEFAULT_SWEEP, None, False
    from django_q.conf import Conf
    from django_q.models import Schedule

    schedule = (
        Schedule.objects.filter(func=TASK)
        .exclude(repeats=0)
        .order_by(F("next_run").desc(nulls_last=True))
        .only("next_run", "schedule_type", "minutes")
        .first()
    )
    if schedule is None or schedule.next_run is None:
        return "no_schedule", DEFAULT_SWEEP, None, bool(Conf.CATCH_UP)
    late = schedule.next_run < now - SCHEDULE_LATE_AFTER
    return (
        "late" if late else "running",
        _interval(schedule),
        schedule.next_run,
        bool(Conf.CATCH_UP),
    )


def _interval(schedule: Any) -> timedelta:
    fixed = {
        schedule.HOURLY: timedelta(hours=1),
        schedule.DAILY: timedelta(days=1),
        schedule.WEEKLY: timedelta(weeks=1),
    }
    if schedule.schedule_type == schedule.MINUTES:
        return timedelta(minutes=schedule.minutes or 1)
    return fixed.get(schedule.schedule_type, DEFAULT_SWEEP)


def _problems() -> list[ProblemGroup]:
    rows = (
        OutgoingMessage.objects.posts()
        .filter(troubled_q())
        .values("problem")
        .annotate(
            posts=Count("pk"),
            held=Count("pk", filter=Q(status=Status.HELD)),
            awaiting_admin=Count("pk", filter=Q(status=Status.HELD, next_attempt_at__isnull=True)),
            example=Max("last_error"),
            since=Min("updated_at"),
            next_attempt=Min("next_attempt_at"),
        )
        .order_by("problem")
    )
    # As written: a bad value of another setting must not break the banner (nor the dashboard).
    password = str(conf.user_settings().get("SMTP_PASSWORD") or "")
    groups = []
    for row in rows:
        kind = row["problem"] or "server"  # a hold from before problems had kinds
        groups.append(
            ProblemGroup(
                kind=kind,
                posts=row["posts"],
                held=row["held"],
                awaiting_admin=row["awaiting_admin"],
                remedy=rules.PROBLEMS.get(kind, rules.PROBLEMS["server"]),
                example=redacted(row["example"] or "", password),
                since=row["since"],
                link=_url(POSTS_CHANGELIST, f"problem={kind}"),
                next_attempt=row["next_attempt"],
            )
        )
    return _merged(groups)


def _merged(groups: list[ProblemGroup]) -> list[ProblemGroup]:
    """One group per kind: an old hold without a kind joins "server"."""
    by_kind: dict[str, ProblemGroup] = {}
    for group in groups:
        seen = by_kind.get(group.kind)
        if seen is None:
            by_kind[group.kind] = group
            continue
        seen.posts += group.posts
        seen.held += group.held
        seen.awaiting_admin += group.awaiting_admin
        seen.example = seen.example or group.example
        seen.since = min(filter(None, (seen.since, group.since)), default=None)
        seen.next_attempt = min(filter(None, (seen.next_attempt, group.next_attempt)), default=None)
    # What needs an administrator first, then the most posts.
    return sorted(by_kind.values(), key=lambda g: (not g.needs_admin, -g.posts, g.kind))


def redacted(text: str, password: str) -> str:
    """An error fit for a page: no SMTP password, no password in a URL, not too long."""
    text = without_url_passwords(without(password, text))
    return Truncator(text).chars(EXAMPLE_CHARS)


def _links(cluster: str) -> dict[str, str]:
    links = {
        "due": _url(POSTS_CHANGELIST, "health=due"),
        "overdue": _url(POSTS_CHANGELIST, "health=overdue"),
        "stalled": _url(POSTS_CHANGELIST, "health=stalled"),
        "sending": _url(POSTS_CHANGELIST, "status__exact=sending"),
        "held": _url(POSTS_CHANGELIST, "status__exact=held"),
        "needs_admin": _url(POSTS_CHANGELIST, "health=needs_admin"),
        "limited": _url(POSTS_CHANGELIST, f"problem={LIMITED}"),
        "members_disabled": _url(
            MEMBERS_CHANGELIST, "delivery_status__exact=by_bounces&disabled=today"
        ),
    }
    installed = cluster != "not_installed"
    links["schedule"] = _url(SCHEDULE_CHANGELIST, "q=" + TASK) if installed else ""
    return links


def _url(name: str, query: str) -> str:
    try:
        url = reverse(name)
    except NoReverseMatch:  # the model is not registered on this site's admin
        return ""
    return f"{url}?{query}" if query else url


def _may_view(user: Any, permission: str) -> bool:
    return user.has_perm(permission % "view") or user.has_perm(permission % "change")


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None
