"""The Django example as a WSGI application, metered by `WSGIMeteringMiddleware`.

Run: METERGATE_ADMIN_TOKEN=dev-token-0123456 python examples/django_project/manage.py runserver
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.wsgi import get_wsgi_application

from metergate import WSGIMeteringMiddleware, load_config

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")

CONFIG = load_config(Path(__file__).resolve().parents[1] / "gateway.yaml")

application = WSGIMeteringMiddleware(get_wsgi_application(), CONFIG)
