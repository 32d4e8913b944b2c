from django.urls import path

from fleet.api import peer_views

urlpatterns = [path("agents", peer_views.agents)]
