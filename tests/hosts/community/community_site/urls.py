from __future__ import annotations

from django.apps import apps
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, URLResolver, include, path

from realtime_kit.health import healthz


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("community home")


site: list[URLPattern | URLResolver] = [
    path("", home, name="home"),
    path("healthz", healthz),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
]
if apps.is_installed("chat"):
    site.append(path("chat/", include("chat.urls")))
if apps.is_installed("notifications"):
    site.append(path("notifications/", include("notifications.urls")))

urlpatterns = [path("community/", include(site))]
