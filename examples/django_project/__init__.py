"""A minimal Django project metered by metergate; see manage.py for the commands that run it."""
