"""Public URLs of listdelivery: include them under any prefix, e.g. ``path("lists/", include("listdelivery.urls"))``."""

from django.urls import path

from . import metrics, unsubscribe

app_name = "listdelivery"

urlpatterns = [
    path("unsubscribe/<str:token>/", unsubscribe.unsubscribe, name="unsubscribe"),
    path("metrics/", metrics.metrics, name="metrics"),
]
