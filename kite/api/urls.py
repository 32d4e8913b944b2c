from django.urls import path

from kite.api import views

urlpatterns = [path("me", views.Me.as_view())]
