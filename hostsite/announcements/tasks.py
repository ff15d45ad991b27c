"""A task the site ran on its own django-q2 cluster before listdelivery came."""

from .models import Announcement


def count_words(announcement_id: int) -> int:
    return len(Announcement.objects.get(pk=announcement_id).body.split())
