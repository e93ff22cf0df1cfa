from __future__ import annotations

from django.urls import path

from . import assistant_views, rooms_views, search_views, views

app_name = "chat"

urlpatterns = [
    path("", views.room_list, name="room_list"),
    # Before "<slug:slug>/": a room slugged "assistant" is shadowed by the panel.
    path("assistant/", assistant_views.assistant_panel, name="assistant"),
    path("assistant/stream/", assistant_views.assistant_stream, name="assistant_stream"),
    # Before "<slug:slug>/" too; rooms_protocol.RESERVED_SLUGS keeps these slugs free.
    path("api/rooms/", rooms_views.rooms_collection, name="api_rooms"),
    path("api/rooms/<slug:slug>/", rooms_views.room_item, name="api_room"),
    path("api/rooms/<slug:slug>/members/", rooms_views.room_members, name="api_members"),
    path(
        "api/rooms/<slug:slug>/members/<str:username>/",
        rooms_views.room_member,
        name="api_member",
    ),
    path("search/", search_views.search_all, name="search"),
    path("<slug:slug>/", views.room_detail, name="room"),
    path("<slug:slug>/search/", search_views.search_room, name="room_search"),
    path("<slug:slug>/messages/", views.room_messages, name="messages"),
    path("<slug:slug>/export/", views.export_messages, name="export"),
    path("<slug:slug>/presence/", views.room_presence, name="presence"),
]
