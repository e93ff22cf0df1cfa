from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

import chat.views
import realtime_kit.health

from . import views

urlpatterns = [
    path("healthz", realtime_kit.health.healthz, name="healthz"),
    # Prometheus: staff sessions, or CHAT_METRICS_TOKEN as a bearer token.
    path("metrics", chat.views.metrics, name="metrics"),
    path("", views.home, name="home"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("chat/", include("chat.urls")),
    path("notifications/", include("notifications.urls")),
    path("admin/", admin.site.urls),
]
