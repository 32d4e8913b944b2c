"""Benchmark baselines, mounted under /bench/ only when KITE_BENCH_ENDPOINTS=on (kite/urls.py)."""

from django.urls import path

from kite.bench import views

urlpatterns = [
    path("bare/<str:team_id>/<str:source>", views.bare),
    path("noop", views.noop),
]
