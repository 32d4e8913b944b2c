from django.urls import path

from ingest.api import views

urlpatterns = [
    path("sources", views.SourceListCreate.as_view()),
    path("events", views.EventList.as_view()),
    path("events/head", views.EventHead.as_view()),
    # An id may hold "/" (sent as %2F): the path converter takes it whole.
    path("events/<path:event_id>/journey", views.EventJourney.as_view()),
]
