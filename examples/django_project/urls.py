"""The example's URLs, matching the routes of examples/gateway.yaml."""

from __future__ import annotations

from django.urls import path
from examples.django_project import views

urlpatterns = [
    path("v1/chat/completions", views.chat_completions),
    path("v1/models", views.models),
    path("healthz", views.healthz),
]
