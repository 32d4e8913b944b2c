"""Mounted at /api/ (kite/urls.py): the audit trail is read at /api/audit, not under /api/federation/."""

from django.urls import path

from federation.api import views

urlpatterns = [path("audit", views.AuditList.as_view())]
