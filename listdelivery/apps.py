from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ListDeliveryConfig(AppConfig):
    name = "listdelivery"
    verbose_name = _("List delivery")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from . import checks  # noqa: F401  (registers the system checks)
        from .tasks import create_sweep_schedule_once

        post_migrate.connect(create_sweep_schedule_once, sender=self)
