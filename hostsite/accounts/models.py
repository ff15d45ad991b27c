from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """The site's own user model: a signature for the announcements an editor sends."""

    signature = models.CharField(max_length=200, blank=True)
