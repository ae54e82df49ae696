"""Run the Django example, metered by metergate with the rules of examples/gateway.yaml.

Run (from the repository root, with metergate and django installed), over WSGI:

    METERGATE_ADMIN_TOKEN=dev-token-0123456 python examples/django_project/manage.py runserver

or over ASGI (with uvicorn installed):

    METERGATE_ADMIN_TOKEN=dev-token-0123456 uvicorn examples.django_project.asgi:application

Then call it as the customer `acme` (plan `pro`, prepaid credits), on port 8000:

    curl -i localhost:8000/v1/models -H 'Authorization: Bearer acme-dev-key'
    curl -i localhost:8000/v1/chat/completions -H 'Authorization: Bearer acme-dev-key' \\
        -H 'Content-Type: application/json' -d '{"messages": [{"content": "hello there"}]}'
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    """Put the repository root on the path, point Django at the settings, run the command."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
