"""Public URLs of listdelivery: include them under any prefix, e.g. ``path("lists/", include("listdelivery.urls"))``."""

from django.urls import path

from . import unsubscribe

app_name = "listdelivery"

urlpatterns = [
    path("unsubscribe/<str:token>/", unsubscribe.unsubscribe, name="unsubscribe"),
]
