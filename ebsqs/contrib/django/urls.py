"""``path("ebsqs/", include("ebsqs.contrib.django.urls"))``: the dashboard (see its views)."""

from __future__ import annotations

from django.urls import path

from ebsqs.contrib.django import views

app_name = "ebsqs"

urlpatterns = [
    path("", views.queues, name="index"),
    path("queues", views.queues, name="queues"),
    path("workers", views.workers, name="workers"),
    path("dead-letters", views.dead_letters, name="dead-letters"),
    path("tasks", views.tasks, name="tasks"),
    path("static/<str:name>", views.static, name="static"),
]
