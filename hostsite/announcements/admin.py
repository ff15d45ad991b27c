from django.contrib import admin

from .models import Announcement


@admin.register(Announcement)
class AnnouncementAdmin(admin.ModelAdmin):
    list_display = ["subject", "mailing_list", "author", "published_at"]
    readonly_fields = ["published_at", "post"]
