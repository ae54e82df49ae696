"""Django settings for the metergate example: no database, no apps, one URLconf.

Metering is not a Django middleware here: `wsgi.py` and `asgi.py` wrap Django's whole application,
so a refused request never reaches Django at all.
"""

from __future__ import annotations

SECRET_KEY = "metergate-example-not-a-secret"  # an example, never deployed
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "examples.django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
WSGI_APPLICATION = "examples.django_project.wsgi.application"
USE_TZ = True
