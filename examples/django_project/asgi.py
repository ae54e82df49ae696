"""The Django example as an ASGI application, metered by `MeteringMiddleware`.

Run: METERGATE_ADMIN_TOKEN=dev-token-0123456 uvicorn examples.django_project.asgi:application
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.asgi import get_asgi_application

from metergate import MeteringMiddleware, load_config

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")

CONFIG = load_config(Path(__file__).resolve().parents[1] / "gateway.yaml")

application = MeteringMiddleware(get_asgi_application(), CONFIG)
