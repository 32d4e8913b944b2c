from django.urls import path

from ingest.api import views

urlpatterns = [
    path("sources", views.SourceListCreate.as_view()),
    path("events", views.EventList.as_view()),
    path("events/head", views.EventHead.as_view()),
]
