from __future__ import annotations

from django.urls import path

from . import views
from .assistant import views as assistant_views

app_name = "chat"

urlpatterns = [
    path("", views.room_list, name="room_list"),
    # Before "<slug:slug>/": a room slugged "assistant" is shadowed by the panel.
    path("assistant/", assistant_views.assistant_panel, name="assistant"),
    path("assistant/stream/", assistant_views.assistant_stream, name="assistant_stream"),
    path("<slug:slug>/", views.room_detail, name="room"),
    path("<slug:slug>/messages/", views.room_messages, name="messages"),
    path("<slug:slug>/export/", views.export_messages, name="export"),
    path("<slug:slug>/presence/", views.room_presence, name="presence"),
]
