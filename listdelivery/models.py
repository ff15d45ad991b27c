"""Mailing lists, their members, the outgoing queue and bounce records."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


def validate_list_address(value: str) -> None:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in value):
        raise ValidationError(_("Enter a posting address such as test@example.com."))


def validate_one_line(value: str) -> None:
    if any(c in value for c in "\r\n\0"):
        raise ValidationError(_("A name cannot contain line breaks."))


def _site_template(name: str) -> str:
    from django.template import TemplateDoesNotExist
    from django.template.loader import get_template

    try:
        return get_template(name).template.source
    except TemplateDoesNotExist:
        return ""


def default_header() -> str:
    """The site-wide header for new lists: the template ``listdelivery/header.txt``."""
    return _site_template("listdelivery/header.txt")


def default_footer() -> str:
    """The site-wide footer for new lists: the template ``listdelivery/footer.txt``."""
    return _site_template("listdelivery/footer.txt")


class Personalization(models.TextChoices):
    NONE = "none", _("No personalization")
    INDIVIDUAL = "individual", _("One copy per member")
    FULL = "full", _("One copy per member, addressed to them")


class DeliveryStatus(models.TextChoices):
    ENABLED = "enabled", _("Enabled")
    BY_USER = "by_user", _("Disabled by the member")
    BY_BOUNCES = "by_bounces", _("Disabled by bounces")
    BY_MODERATOR = "by_moderator", _("Disabled by a moderator")


class MailingList(models.Model):
    address = models.CharField(
        _("posting address"), max_length=254, unique=True, validators=[validate_list_address]
    )
    list_id = models.CharField(_("list ID"), max_length=254, unique=True, editable=False)
    display_name = models.CharField(
        _("display name"), max_length=200, blank=True, validators=[validate_one_line]
    )
    personalize = models.CharField(
        _("personalization"),
        max_length=20,
        choices=Personalization.choices,
        default=Personalization.NONE,
    )
    post_id = models.PositiveIntegerField(
        _("post counter"), default=1, help_text=_("Number of the next post; drives VERP intervals.")
    )
    last_post_at = models.DateTimeField(_("last post at"), null=True, blank=True)
    header = models.TextField(
        _("header"),
        blank=True,
        default=default_header,
        help_text=_(
            "Put before each post. Mailman's $names: $display_name, $listname, "
            "$user_address, $user_name_or_address, $unsubscribe_url …"
        ),
    )
    footer = models.TextField(
        _("footer"),
        blank=True,
        default=default_footer,
        help_text=_("Put after each post; as the header."),
    )
    archive_url = models.URLField(
        _("archive URL"), blank=True, help_text=_("Sent as the List-Archive header when set.")
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    class Meta:
        ordering = ["address"]
        verbose_name = _("mailing list")
        verbose_name_plural = _("mailing lists")

    def __str__(self) -> str:
        return self.address

    def save(self, *args, **kwargs) -> None:
        validate_one_line(self.display_name)  # it goes into List-Id on every copy
        self.list_id = self.address.replace("@", ".", 1).lower()
        if not self.display_name:
            self.display_name = self.list_name.capitalize()
        super().save(*args, **kwargs)

    @property
    def list_name(self) -> str:
        return self.address.rpartition("@")[0]

    @property
    def mail_host(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def bounces_address(self) -> str:
        return f"{self.list_name}-bounces@{self.mail_host}"

    @property
    def leave_address(self) -> str:
        return f"{self.list_name}-leave@{self.mail_host}"

    def variables(self) -> dict[str, str]:
        """Mailman's list substitutions for decoration (``$display_name``, ``$listname`` …)."""
        local, domain = self.list_name, self.mail_host
        return {
            "display_name": self.display_name,
            "listname": self.address,
            "fqdn_listname": self.address,
            "list_name": local,
            "short_listname": local,
            "list_id": self.list_id,
            "domain": domain,
            "mail_host": domain,
            "request_email": f"{local}-request@{domain}",
            "owner_email": f"{local}-owner@{domain}",
            "description": "",
            "info": "",
        }


class Member(models.Model):
    mailing_list = models.ForeignKey(
        MailingList, on_delete=models.CASCADE, related_name="members", verbose_name=_("list")
    )
    address = models.CharField(_("address"), max_length=254)
    display_name = models.CharField(_("display name"), max_length=200, blank=True)
    delivery_status = models.CharField(
        _("delivery"),
        max_length=20,
        choices=DeliveryStatus.choices,
        default=DeliveryStatus.ENABLED,
    )
    bounce_score = models.PositiveIntegerField(_("bounce score"), default=0)
    last_bounce_received = models.DateField(_("last bounce"), null=True, blank=True)
    disabled_at = models.DateTimeField(
        _("delivery disabled at"),
        null=True,
        blank=True,
        help_text=_("When delivery to this member was last disabled, by bounces or by hand."),
    )
    created_at = models.DateTimeField(_("subscribed"), auto_now_add=True)

    class Meta:
        ordering = ["address"]
        verbose_name = _("member")
        verbose_name_plural = _("members")
        constraints = [
            models.UniqueConstraint(
                "mailing_list", Lower("address"), name="listdelivery_member_unique_address"
            )
        ]
        indexes = [
            models.Index(fields=["mailing_list", "address"], name="listdelivery_member_address"),
            models.Index(fields=["delivery_status", "disabled_at"], name="listdelivery_disabled"),
        ]

    def __str__(self) -> str:
        return f"{self.display_name} <{self.address}>" if self.display_name else self.address

    def clean(self) -> None:
        if any(c in self.display_name for c in "\r\n\0"):
            raise ValidationError({"display_name": _("A name cannot contain line breaks.")})


class OutgoingMessageQuerySet(models.QuerySet):
    def posts(self) -> OutgoingMessageQuerySet:
        """Posts, without the shards of big posts (a sharded post speaks for its shards)."""
        return self.filter(parent__isnull=True)


class OutgoingMessage(models.Model):
    """One post waiting for, or done with, delivery: the queue row.

    A post to more than ``SHARD_SIZE`` recipients is split into shards
    (:mod:`listdelivery.shards`): rows of this model with a ``parent``, each
    delivering the post's recipients from ``first_recipient`` to
    ``last_recipient`` with a lease, checkpoints and retries of its own. The
    post itself is then never claimed; its status, counters and times are
    rolled up from its shards'.
    """

    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        SENDING = "sending", _("Sending")
        RETRY = "retry", _("Waiting to retry")
        HELD = "held", _("Held by a server error")
        PAUSED = "paused", _("Paused")
        DELIVERED = "delivered", _("Delivered")
        FAILED = "failed", _("Failed")
        DISCARDED = "discarded", _("Discarded")

    #: Statuses a runner may claim or hold: sending is one, so that a post whose
    #: runner died (its lease ran out) is taken over.
    WAITING = (Status.QUEUED, Status.RETRY, Status.HELD, Status.SENDING)

    mailing_list = models.ForeignKey(
        MailingList,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="outgoing",
        verbose_name=_("list"),
    )
    list_id = models.CharField(_("list ID"), max_length=254, db_index=True)
    message = models.BinaryField(_("message bytes"))
    message_id = models.CharField(_("Message-ID"), max_length=998, blank=True, db_index=True)
    subject = models.CharField(_("subject"), max_length=998, blank=True)
    metadata = models.JSONField(_("metadata"), default=dict, encoder=DjangoJSONEncoder)
    status = models.CharField(
        _("status"), max_length=20, choices=Status.choices, default=Status.QUEUED
    )
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    next_attempt_at = models.DateTimeField(
        _("next attempt"),
        null=True,
        blank=True,
        default=timezone.now,
        help_text=_("Empty for a post held until an administrator retries it."),
    )
    deliver_until = models.DateTimeField(_("retry deadline"), null=True, blank=True)
    last_failure_count = models.PositiveIntegerField(
        _("recipients failing at the last attempt"), default=0
    )
    last_error = models.TextField(_("last error"), blank=True)
    problem = models.CharField(
        _("problem"),
        max_length=20,
        blank=True,
        help_text=_("What kind of server trouble holds the post: auth, tls, connection …"),
    )
    recipient_count = models.PositiveIntegerField(_("recipients"), default=0)
    sent_count = models.PositiveIntegerField(_("accepted"), default=0)
    deferred_count = models.PositiveIntegerField(_("deferred"), default=0)
    bounced_count = models.PositiveIntegerField(_("bounced"), default=0)
    failed_count = models.PositiveIntegerField(_("failed"), default=0)
    sending_since = models.DateTimeField(
        _("sending since"), null=True, blank=True, help_text=_("When the current attempt began.")
    )
    rate = models.FloatField(
        _("rate"), null=True, blank=True, help_text=_("Recipients per second in this attempt.")
    )
    finish_estimate = models.DateTimeField(_("estimated finish"), null=True, blank=True)
    unexpected_errors = models.PositiveIntegerField(
        _("unexpected errors in a row"),
        default=0,
        help_text=_("Attempts that ended in an error of listdelivery itself, in a row."),
    )
    parent = models.ForeignKey(
        "self",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="shards",
        verbose_name=_("post"),
        help_text=_("Set on a shard: the post whose recipients it delivers."),
    )
    shard_count = models.PositiveIntegerField(
        _("shards"), default=0, help_text=_("Into how many shards the post was split; 0: none.")
    )
    first_recipient = models.PositiveBigIntegerField(null=True, blank=True, editable=False)
    last_recipient = models.PositiveBigIntegerField(null=True, blank=True, editable=False)
    lease_token = models.CharField(max_length=32, blank=True, editable=False)
    leased_until = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(_("queued at"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)

    objects = OutgoingMessageQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = _("outgoing message")
        verbose_name_plural = _("outgoing messages")
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="listdelivery_due"),
        ]

    def __str__(self) -> str:
        return self.message_id or self.subject or f"post {self.pk}"

    @property
    def raw(self) -> bytes:
        """The post's bytes (a shard's are its post's, stored once)."""
        if self.parent_id is not None:
            return bytes(self.parent.message)
        return bytes(self.message)

    @property
    def is_shard(self) -> bool:
        return self.parent_id is not None

    def recipient_rows(self) -> models.QuerySet[OutgoingRecipient]:
        """The recipients this row delivers: a post's all, a shard's its range of the post's."""
        if self.parent_id is None:
            return OutgoingRecipient.objects.filter(message_id=self.pk)
        return OutgoingRecipient.objects.filter(
            message_id=self.parent_id, id__gte=self.first_recipient, id__lte=self.last_recipient
        )

    @property
    def pending_count(self) -> int:
        """Recipients not yet tried (deferred ones are counted apart)."""
        done = self.sent_count + self.deferred_count + self.bounced_count + self.failed_count
        return max(self.recipient_count - done, 0)

    @property
    def open_count(self) -> int:
        """Recipients still to deliver: pending and deferred."""
        return self.pending_count + self.deferred_count

    @property
    def progress(self) -> float:
        """The share of recipients with a final answer, 0 to 1."""
        if not self.recipient_count:
            return 0.0
        return 1 - self.open_count / self.recipient_count

    @property
    def is_scheduled(self) -> bool:
        """Queued and not due yet (``deliver_after``)."""
        return (
            self.status == self.Status.QUEUED
            and self.next_attempt_at is not None
            and self.next_attempt_at > timezone.now()
        )

    @property
    def is_stalled(self) -> bool:
        """Sending, but its runner stopped (its lease ran out): another will take it over."""
        return self.status == self.Status.SENDING and (
            self.leased_until is None or self.leased_until < timezone.now()
        )


class OutgoingRecipient(models.Model):
    """One recipient of one post: the unit of delivery progress."""

    class Status(models.TextChoices):
        PENDING = "pending", _("Pending")
        DEFERRED = "deferred", _("Deferred by a temporary failure")
        SENT = "sent", _("Accepted by the SMTP server")
        BOUNCED = "bounced", _("Refused permanently")
        FAILED = "failed", _("Failed")

    OPEN = (Status.PENDING, Status.DEFERRED)

    message = models.ForeignKey(
        OutgoingMessage, on_delete=models.CASCADE, related_name="recipients"
    )
    address = models.CharField(_("address"), max_length=254)
    status = models.CharField(
        _("status"), max_length=20, choices=Status.choices, default=Status.PENDING
    )
    smtp_code = models.PositiveSmallIntegerField(_("SMTP code"), null=True, blank=True)
    smtp_message = models.TextField(_("SMTP message"), blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)

    class Meta:
        ordering = ["id"]
        verbose_name = _("recipient")
        verbose_name_plural = _("recipients")
        indexes = [
            models.Index(fields=["message", "status"], name="listdelivery_recipient_open"),
            models.Index(fields=["finished_at"], name="listdelivery_recipient_done"),
        ]

    def __str__(self) -> str:
        return self.address


class BounceEvent(models.Model):
    class Context(models.TextChoices):
        NORMAL = "normal", _("Refused at delivery")
        PROBE = "probe", _("Probe")
        BOUNCE = "bounce", _("Bounce message")

    mailing_list = models.ForeignKey(
        MailingList, on_delete=models.CASCADE, related_name="bounces", verbose_name=_("list")
    )
    address = models.CharField(_("address"), max_length=254, db_index=True)
    smtp_code = models.PositiveSmallIntegerField(_("SMTP code"), null=True, blank=True)
    smtp_message = models.TextField(_("diagnostic"), blank=True)
    message_id = models.CharField(_("Message-ID of the post"), max_length=998, blank=True)
    context = models.CharField(
        _("context"), max_length=20, choices=Context.choices, default=Context.NORMAL
    )
    created_at = models.DateTimeField(_("time"), default=timezone.now, db_index=True)
    fingerprint = models.CharField(
        _("bounce message digest"),
        max_length=64,
        blank=True,
        db_index=True,
        help_text=_(
            "Of the bounce message that reported it, so that reading it again counts once."
        ),
    )
    processed = models.BooleanField(
        _("scored"), default=False, help_text=_("Counted in the member's bounce score.")
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = _("bounce event")
        verbose_name_plural = _("bounce events")

    def __str__(self) -> str:
        return f"{self.address} ({self.smtp_code})"


class DeliveryAttempt(models.Model):
    """One run of a runner over one post: what it sent, what came back, how it ended."""

    message = models.ForeignKey(
        OutgoingMessage, on_delete=models.CASCADE, related_name="attempt_log"
    )
    number = models.PositiveIntegerField(_("attempt"))
    runner = models.CharField(_("runner"), max_length=200, blank=True)
    started_at = models.DateTimeField(_("started"))
    finished_at = models.DateTimeField(_("finished"))
    accepted = models.PositiveIntegerField(_("accepted"), default=0)
    deferred = models.PositiveIntegerField(_("deferred"), default=0)
    bounced = models.PositiveIntegerField(_("bounced"), default=0)
    failed = models.PositiveIntegerField(_("failed"), default=0)
    transactions = models.PositiveIntegerField(_("SMTP transactions"), default=0)
    first_error = models.TextField(_("first server error"), blank=True)
    outcome = models.CharField(_("ended"), max_length=20)
    reason = models.TextField(_("reason"), blank=True)

    class Meta:
        ordering = ["message", "started_at", "id"]
        verbose_name = _("delivery attempt")
        verbose_name_plural = _("delivery attempts")
        indexes = [models.Index(fields=["message", "started_at"], name="listdelivery_attempt_post")]

    def __str__(self) -> str:
        return f"attempt {self.number} of post {self.message_id}"


class DeliveryHour(models.Model):
    """Recipients answered in one hour for one list: what the charts and metrics read.

    Written in the same transaction as the recipients themselves, so the totals
    match them; an administrator's cancel is not a failure and is not counted.
    """

    hour = models.DateTimeField(_("hour"))
    list_id = models.CharField(_("list ID"), max_length=254)
    sent = models.PositiveBigIntegerField(_("accepted"), default=0)
    bounced = models.PositiveBigIntegerField(_("bounced"), default=0)
    failed = models.PositiveBigIntegerField(_("failed"), default=0)

    class Meta:
        ordering = ["-hour", "list_id"]
        verbose_name = _("delivery totals of an hour")
        verbose_name_plural = _("delivery totals by hour")
        constraints = [
            models.UniqueConstraint(fields=["hour", "list_id"], name="listdelivery_hour_unique")
        ]

    def __str__(self) -> str:
        return f"{self.list_id} {self.hour:%Y-%m-%d %H:00}"


class RunnerPass(models.Model):
    """The last pass of any runner over the queue: one row, for the health check."""

    finished_at = models.DateTimeField(_("finished at"))
    runner = models.CharField(_("runner"), max_length=200, blank=True)
    posts = models.PositiveIntegerField(_("posts"), default=0)
    seconds = models.FloatField(_("seconds"), default=0.0)

    class Meta:
        verbose_name = _("runner pass")
        verbose_name_plural = _("runner passes")

    def __str__(self) -> str:
        return f"{self.runner} at {self.finished_at}"


class LimitState(models.Model):
    """One shared rate limit: its GCRA state and the rate learned from the server's replies.

    Times are seconds since the epoch (``time.time()``), not datetimes, so that
    one UPDATE can do the arithmetic on SQLite and PostgreSQL alike.
    """

    key = models.CharField(_("limit"), max_length=200, unique=True)
    rate = models.CharField(
        _("configured rate"), max_length=50, blank=True, help_text=_("As last used, e.g. 14/s.")
    )
    tat = models.FloatField(
        _("theoretical arrival time"),
        default=0.0,
        help_text=_("When the tokens taken so far will all have been paid back."),
    )
    learned = models.FloatField(
        _("learned share of the rate"),
        default=1.0,
        help_text=_("Lowered at once by a 'slow down' reply, raised again after quiet periods."),
    )
    changed_at = models.FloatField(_("learned share changed at"), default=0.0)
    decreased_at = models.FloatField(_("last slowed down at"), default=0.0)
    throttled_until = models.FloatField(
        _("throttled until"), default=0.0, help_text=_("Nothing is taken before this time.")
    )

    class Meta:
        ordering = ["key"]
        verbose_name = _("rate limit")
        verbose_name_plural = _("rate limits")

    def __str__(self) -> str:
        return self.key


class LimitSlot(models.Model):
    """One of the connection slots of a limit; free when no one holds it or its holder's time ran out."""

    key = models.CharField(_("limit"), max_length=200)
    number = models.PositiveIntegerField(_("slot"))
    holder = models.CharField(_("holder"), max_length=200, blank=True)
    token = models.CharField(max_length=32, blank=True, editable=False)
    expires_at = models.FloatField(_("expires at"), default=0.0)

    class Meta:
        ordering = ["key", "number"]
        verbose_name = _("connection slot")
        verbose_name_plural = _("connection slots")
        constraints = [
            models.UniqueConstraint(fields=["key", "number"], name="listdelivery_slot_unique")
        ]

    def __str__(self) -> str:
        return f"{self.key} #{self.number}"


class LimitQuota(models.Model):
    """What one quota has used on one UTC day."""

    key = models.CharField(_("limit"), max_length=200)
    day = models.DateField(_("day (UTC)"))
    used = models.PositiveBigIntegerField(_("used"), default=0)

    class Meta:
        ordering = ["key", "-day"]
        verbose_name = _("daily quota")
        verbose_name_plural = _("daily quotas")
        constraints = [
            models.UniqueConstraint(fields=["key", "day"], name="listdelivery_quota_unique")
        ]

    def __str__(self) -> str:
        return f"{self.key} {self.day}"
