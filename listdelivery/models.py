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
            models.Index(fields=["mailing_list", "address"], name="listdelivery_member_address")
        ]

    def __str__(self) -> str:
        return f"{self.display_name} <{self.address}>" if self.display_name else self.address

    def clean(self) -> None:
        if any(c in self.display_name for c in "\r\n\0"):
            raise ValidationError({"display_name": _("A name cannot contain line breaks.")})


class OutgoingMessage(models.Model):
    """One post waiting for, or done with, delivery: the queue row."""

    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        RETRY = "retry", _("Waiting to retry")
        HELD = "held", _("Held by a server error")
        PAUSED = "paused", _("Paused")
        DELIVERED = "delivered", _("Delivered")
        FAILED = "failed", _("Failed")
        DISCARDED = "discarded", _("Discarded")

    WAITING = (Status.QUEUED, Status.RETRY, Status.HELD)

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
    unexpected_errors = models.PositiveIntegerField(
        _("unexpected errors in a row"),
        default=0,
        help_text=_("Attempts that ended in an error of listdelivery itself, in a row."),
    )
    lease_token = models.CharField(max_length=32, blank=True, editable=False)
    leased_until = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(_("queued at"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)

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
        return bytes(self.message)


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
