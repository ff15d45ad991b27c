"""Prometheus metrics of delivery, read from the database at every scrape.

Every number comes from the database when Prometheus asks, so it is right with
any number of runners on any number of machines, and nothing is kept in a
process. A scrape costs a fixed handful of aggregate queries, whatever the size
of the queue; none reads the recipients table (the hourly totals of
:class:`~listdelivery.models.DeliveryHour` and the counters on each post stand
in for it). With traffic shaping configured, each relay and destination
group is read from the shared limits store too: a few queries each in the
database store, as many as the settings have relays and groups.

The metrics are built on a fresh :class:`~prometheus_client.CollectorRegistry`
per scrape, never on prometheus_client's global registry, which a host site may
use for its own metrics.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.contrib.auth.decorators import login_not_required
from django.db.models import Case, Count, F, FloatField, Func, Min, Q, Sum, When
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from . import conf, health
from .models import BounceEvent, DeliveryHour, DeliveryStatus, Member, OutgoingMessage, RunnerPass
from .rules import PROBLEMS

Status = OutgoingMessage.Status

#: Posts not finished: the waiting ones and the paused ones, whose recipients are still open.
OPEN = (*OutgoingMessage.WAITING, Status.PAUSED)
#: Sending posts shown one by one, oldest first; the labels stay bounded.
SENDING_POSTS_SHOWN = 50
#: Upper bounds of the delivery time histogram, in seconds: 1 s to 1 day.
DELIVERY_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
#: Finished posts the histogram covers: those a runner finished (not a cancel).
TIMED = (Status.DELIVERED, Status.FAILED)


class DeliveryCollector:
    """Reads the queue, the hourly totals and the last runner pass; yields metric families."""

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        yield from self.posts()
        yield from self.open_posts(now)
        yield from self.recipients_answered()
        yield from self.last_pass()
        yield from self.sending_posts(now)
        yield self.delivery_time()
        yield from self.members_and_bounces()
        yield from self.sending_limits()

    def posts(self) -> Iterator[Metric]:
        counts = dict(
            OutgoingMessage.objects.posts().order_by().values_list("status").annotate(n=Count("pk"))
        )
        posts = GaugeMetricFamily(
            "listdelivery_posts", "Posts in the queue, by status.", labels=["status"]
        )
        for status in Status.values:
            posts.add_metric([status], counts.get(status, 0))
        yield posts

    def open_posts(self, now: datetime) -> Iterator[Metric]:
        """What the posts not finished hold: open recipients, problems, stalls, the oldest."""
        stalled = Q(status=Status.SENDING) & (Q(leased_until__lt=now) | Q(leased_until=None))
        scheduled = Q(status=Status.QUEUED, next_attempt_at__gt=now)
        # A post queued for later (deliver_after) waits from the time it was due.
        waiting_since = Case(
            When(
                status=Status.QUEUED,
                next_attempt_at__gt=F("created_at"),
                then=F("next_attempt_at"),
            ),
            default=F("created_at"),
        )
        rows = (
            OutgoingMessage.objects.posts()
            .filter(status__in=OPEN)
            .order_by()
            .values_list("problem")
            .annotate(
                posts=Count("pk"),
                stalled=Count("pk", filter=stalled),
                recipients=Sum("recipient_count"),
                answered=Sum(F("sent_count") + F("bounced_count") + F("failed_count")),
                deferred=Sum("deferred_count"),
                oldest=Min(
                    waiting_since, filter=Q(status__in=OutgoingMessage.WAITING) & ~scheduled
                ),
            )
        )
        pending = deferred = stalled_posts = 0
        oldest: datetime | None = None
        by_problem = dict.fromkeys(PROBLEMS, 0)
        for problem, posts, stalled_here, recipients, answered, deferred_here, since in rows:
            deferred += deferred_here or 0
            pending += max((recipients or 0) - (answered or 0) - (deferred_here or 0), 0)
            stalled_posts += stalled_here
            if problem:
                by_problem[problem] = by_problem.get(problem, 0) + posts
            if since is not None and (oldest is None or since < oldest):
                oldest = since

        open_recipients = GaugeMetricFamily(
            "listdelivery_recipients_open",
            "Recipients of posts not finished (paused ones included) still to deliver: "
            "pending (not tried yet) and deferred (a temporary failure, to retry).",
            labels=["status"],
        )
        open_recipients.add_metric(["pending"], pending)
        open_recipients.add_metric(["deferred"], deferred)
        yield open_recipients

        troubled = GaugeMetricFamily(
            "listdelivery_posts_with_problem",
            "Posts not finished that server trouble holds or delays, by kind of trouble.",
            labels=["problem"],
        )
        for problem, posts in by_problem.items():
            troubled.add_metric([problem], posts)
        yield troubled

        yield GaugeMetricFamily(
            "listdelivery_stalled_posts",
            "Posts marked sending whose runner stopped (its lease ran out): another runner "
            "takes them over.",
            value=stalled_posts,
        )
        yield GaugeMetricFamily(
            "listdelivery_oldest_waiting_post_age_seconds",
            "Age of the oldest post due and not finished (queued, sending, retry or held; "
            "paused and scheduled posts left out), from when it was queued or due; 0 when none.",
            value=(now - oldest).total_seconds() if oldest else 0,
        )

    def recipients_answered(self) -> Iterator[Metric]:
        totals = DeliveryHour.objects.aggregate(
            sent=Sum("sent"), bounced=Sum("bounced"), failed=Sum("failed")
        )
        answered = CounterMetricFamily(
            "listdelivery_recipients",
            "Recipients answered since the start: sent (accepted by the SMTP server), bounced "
            "(refused permanently) or failed (given up). An administrator's cancel is not counted.",
            labels=["status"],
        )
        for status, total in totals.items():
            answered.add_metric([status], total or 0)
        yield answered

    def last_pass(self) -> Iterator[Metric]:
        last = (
            RunnerPass.objects.filter(pk=1).values_list("finished_at", "seconds", "posts").first()
        )
        finished_at, seconds, posts = last or (None, 0.0, 0)
        yield GaugeMetricFamily(
            "listdelivery_last_run_finished_timestamp_seconds",
            "When a runner last finished a pass over the queue (Unix time); 0: never.",
            value=finished_at.timestamp() if finished_at else 0,
        )
        yield GaugeMetricFamily(
            "listdelivery_last_run_duration_seconds",
            "How long the last pass over the queue took.",
            value=seconds,
        )
        yield GaugeMetricFamily(
            "listdelivery_last_run_posts",
            "Posts the last pass over the queue worked on.",
            value=posts,
        )

    def sending_posts(self, now: datetime) -> Iterator[Metric]:
        """One series per post being sent now, the oldest few only."""
        labels = ["post", "list"]
        progress = GaugeMetricFamily(
            "listdelivery_sending_post_progress_ratio",
            f"Share of a sending post's recipients with a final answer, 0 to 1 (the "
            f"{SENDING_POSTS_SHOWN} oldest sending posts).",
            labels=labels,
        )
        rate = GaugeMetricFamily(
            "listdelivery_sending_post_rate",
            "Recipients per second of a sending post in its current attempt.",
            labels=labels,
        )
        finish = GaugeMetricFamily(
            "listdelivery_sending_post_finish_estimate_timestamp_seconds",
            "When a sending post should be finished at its current rate (Unix time).",
            labels=labels,
        )
        posts = (
            OutgoingMessage.objects.posts()
            .filter(status=Status.SENDING)
            .order_by(F("sending_since").asc(nulls_first=True), "pk")
        )
        fields = ["pk", "list_id", "recipient_count", "deferred_count", "rate", "finish_estimate"]
        fields += ["sent_count", "bounced_count", "failed_count"]
        for post in posts.only(*fields)[:SENDING_POSTS_SHOWN]:
            names = [str(post.pk), post.list_id]
            progress.add_metric(names, post.progress)
            if post.rate is not None:
                rate.add_metric(names, post.rate)
            if post.finish_estimate is not None:
                finish.add_metric(names, post.finish_estimate.timestamp())
        yield from (progress, rate, finish)

    def delivery_time(self) -> Metric:
        """Queued to finished, for every post a runner finished, in one aggregate query.

        Posts given a ``deliver_after`` time are left out: their wait is the schedule's.
        """
        buckets = {
            f"le_{i}": Count("pk", filter=Q(took__lte=bound))
            for i, bound in enumerate(DELIVERY_BUCKETS)
        }
        rows = (
            OutgoingMessage.objects.posts()
            .filter(status__in=TIMED, finished_at__isnull=False)
            .exclude(metadata__has_key="deliver_after")
            .alias(took=SecondsBetween("finished_at", "created_at"))
            .order_by()
            .values("status")
            .annotate(total=Count("pk"), seconds=Sum("took"), **buckets)
        )
        histogram = HistogramMetricFamily(
            "listdelivery_post_delivery_seconds",
            "Time from queueing to the end of delivery of each post a runner finished, by how "
            "it ended (delivered or failed); posts scheduled with deliver_after left out.",
            labels=["status"],
        )
        found = {row["status"]: row for row in rows}
        for status in TIMED:
            row = found.get(status, {})
            bounds = [
                (str(float(bound)), row.get(f"le_{i}", 0))
                for i, bound in enumerate(DELIVERY_BUCKETS)
            ]
            bounds.append(("+Inf", row.get("total", 0)))
            histogram.add_metric([status], bounds, float(row.get("seconds") or 0))
        return histogram

    def members_and_bounces(self) -> Iterator[Metric]:
        disabled = dict(
            Member.objects.exclude(delivery_status=DeliveryStatus.ENABLED)
            .order_by()
            .values_list("delivery_status")
            .annotate(n=Count("pk"))
        )
        members = GaugeMetricFamily(
            "listdelivery_members_disabled",
            "Members whose delivery is disabled, by who disabled it.",
            labels=["reason"],
        )
        for status in DeliveryStatus.values:
            if status != DeliveryStatus.ENABLED:
                members.add_metric([status], disabled.get(status, 0))
        yield members

        events = dict(BounceEvent.objects.order_by().values_list("context").annotate(n=Count("pk")))
        bounces = CounterMetricFamily(
            "listdelivery_bounce_events",
            "Bounce events recorded: refusals at delivery (normal), bounce messages, probes.",
            labels=["context"],
        )
        for context in BounceEvent.Context.values:
            bounces.add_metric([context], events.get(context, 0))
        yield bounces

    def sending_limits(self) -> Iterator[Metric]:
        """Each relay and destination group as the shared limits store has it; none unshaped."""
        limits, error = health.sending_limits()
        if not limits and not error:
            return
        yield GaugeMetricFamily(
            "listdelivery_limits_store_up",
            "1 when the shared sending limits could be read, 0 when not (Redis down?).",
            value=0 if error else 1,
        )
        relay, group = ["relay"], ["group"]
        families = {
            "relay_rate": GaugeMetricFamily(
                "listdelivery_relay_rate",
                "A relay's configured rate (its first), in messages per second.",
                labels=relay,
            ),
            "relay_learned": GaugeMetricFamily(
                "listdelivery_relay_learned_rate",
                "A relay's rate now, in messages per second: lower than configured after the "
                "server asked to slow down, climbing back after a quiet spell.",
                labels=relay,
            ),
            "sessions": GaugeMetricFamily(
                "listdelivery_relay_sessions",
                "Sessions open to a relay with a session cap (CONNECTIONS), by every runner.",
                labels=relay,
            ),
            "quota_used": GaugeMetricFamily(
                "listdelivery_relay_quota_used",
                "Recipients sent through a relay with a daily quota today (UTC).",
                labels=relay,
            ),
            "quota": GaugeMetricFamily(
                "listdelivery_relay_quota", "A relay's daily quota (QUOTA).", labels=relay
            ),
            "resting": GaugeMetricFamily(
                "listdelivery_relay_resting",
                "1 while a relay rests after refusing the connection, TLS or the login.",
                labels=relay,
            ),
            "group_rate": GaugeMetricFamily(
                "listdelivery_destination_rate",
                "A destination group's configured rate (its first), in messages per second.",
                labels=group,
            ),
            "group_learned": GaugeMetricFamily(
                "listdelivery_destination_learned_rate",
                "A destination group's rate now, in messages per second.",
                labels=group,
            ),
        }
        for limit in limits:
            name = [limit.name]
            prefix = "relay" if limit.kind == "relay" else "group"
            if limit.rate is not None and limit.learned_rate is not None:
                families[f"{prefix}_rate"].add_metric(name, limit.rate.per_second)
                families[f"{prefix}_learned"].add_metric(name, limit.learned_rate)
            if limit.kind != "relay":
                continue
            if limit.connections:
                families["sessions"].add_metric(name, limit.sessions or 0)
            if limit.quota:
                families["quota_used"].add_metric(name, limit.quota_used or 0)
                families["quota"].add_metric(name, limit.quota)
            families["resting"].add_metric(name, 1 if limit.resting else 0)
        yield from families.values()


class SecondsBetween(Func):
    """``end - start`` in seconds, as a float, in SQL.

    Not Django's duration arithmetic: on SQLite that is a Python function called for
    every row and every bucket (0.9 s for 14,000 posts); ``julianday`` is built in.
    """

    output_field = FloatField()

    def __init__(self, end: str, start: str) -> None:
        super().__init__(F(end), F(start))

    def _compiled(self, compiler: Any, connection: Any) -> tuple[str, str, list[Any]]:
        end, end_params = compiler.compile(self.source_expressions[0])
        start, start_params = compiler.compile(self.source_expressions[1])
        return end, start, [*end_params, *start_params]

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        end, start, params = self._compiled(compiler, connection)
        # date_part, not EXTRACT: it stays double precision (EXTRACT became a slower numeric).
        return f"date_part('epoch', {end} - {start})", params

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        end, start, params = self._compiled(compiler, connection)
        return f"((julianday({end}) - julianday({start})) * 86400.0)", params


def registry() -> CollectorRegistry:
    """A registry of its own holding only listdelivery's metrics."""
    fresh = CollectorRegistry(auto_describe=False)
    fresh.register(DeliveryCollector())
    return fresh


# -- the view ------------------------------------------------------------------


def _bearer_token(request: HttpRequest) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _token_matches(token: str) -> bool:
    expected = conf.get("METRICS_TOKEN")
    # Bytes: compare_digest refuses str with characters beyond ASCII.
    return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())


def _may_read(user: Any) -> bool:
    return user.is_active and user.is_staff and user.has_perm("listdelivery.view_outgoingmessage")


def _unauthorized(error: str = "") -> HttpResponse:
    response = HttpResponse("Unauthorized\n", status=401, content_type="text/plain")
    challenge = 'Bearer realm="listdelivery metrics"'
    if error:
        challenge += f', error="{error}"'
    response["WWW-Authenticate"] = challenge
    return response


@login_not_required  # a scraper has a token, not a session, even under LoginRequiredMiddleware
@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format; a scraper's ``Accept`` may ask for OpenMetrics.

    Open to ``Authorization: Bearer <METRICS_TOKEN>`` (judged alone when the header is
    there), or to a signed-in staff member who may view the outgoing messages.
    """
    token = _bearer_token(request)
    user = getattr(request, "user", None)  # None without AuthenticationMiddleware
    if token is not None:
        if not _token_matches(token):
            return _unauthorized("invalid_token")
    elif user is None or not user.is_authenticated:
        return _unauthorized()
    elif not _may_read(user):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry()), content_type=content_type)
