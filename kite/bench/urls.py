from django.urls import path

urlpatterns: list = []  # filled by the benchmark issue work (bench/ingest.py baseline endpoint)
