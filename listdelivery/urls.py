"""Public URLs of listdelivery: include them under any prefix, e.g. ``path("lists/", include("listdelivery.urls"))``."""

from django.urls import path

from . import metrics, unsubscribe
from .views import health_check

app_name = "listdelivery"

urlpatterns = [
    path("unsubscribe/<str:token>/", unsubscribe.unsubscribe, name="unsubscribe"),
    path("health/", health_check, name="health"),
    path("metrics/", metrics.metrics, name="metrics"),
]
