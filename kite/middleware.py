"""An unreachable database or broker is a 503 the caller may retry, never a 500 (README "Operating Kite": outages)."""

from kite.errors import outage_error


class OutageMiddleware:
    """Maps a view's connection-level database error (PostgreSQL restarting, connections refused)
    or broker error (Redis unreachable) to 503 {detail, code} with Retry-After; DRF views get the
    same from kite.errors.exception_handler, and a failure outside any view from handler500."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        outage = outage_error(exception)
        return outage.response() if outage is not None else None
