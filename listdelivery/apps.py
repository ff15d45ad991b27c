from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ListDeliveryConfig(AppConfig):
    name = "listdelivery"
    verbose_name = _("List delivery")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
