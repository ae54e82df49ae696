"""The operator dashboard: server-rendered pages on the admin port (SPEC section 4.1)."""

from metergate.ui.app import dashboard_app

__all__ = ["dashboard_app"]
