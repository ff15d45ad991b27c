from django.conf import settings
from django.db import models


class Announcement(models.Model):
    """What an editor writes; publishing it queues one post to the list's members."""

    mailing_list = models.ForeignKey(
        "listdelivery.MailingList", on_delete=models.PROTECT, related_name="announcements"
    )
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT)
    subject = models.CharField(max_length=200)
    body = models.TextField()
    published_at = models.DateTimeField(null=True, blank=True)
    post = models.OneToOneField(
        "listdelivery.OutgoingMessage",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="announcement",
    )

    def __str__(self) -> str:
        return self.subject
