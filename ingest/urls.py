from django.urls import path

from ingest import views

urlpatterns = [path("hooks/<str:team_id>/<str:source>", views.hook, name="hook")]
