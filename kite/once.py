"""What a screen shows once after a redirect: Post/Redirect/Get without losing the secret.

A form that succeeds redirects (a reload then re-reads the page, it does not resubmit the
form: no second rotation). What its answer has to show once — a generated secret, token or
invitation, a ping's verdict — is kept in the session for exactly one read by the page
redirected to: encrypted under KITE_ENCRYPTION_KEYS (the session row is in the database),
never in the URL, dropped by that page's first GET and ignored after TTL_SECONDS.
"""

import json
import time
from urllib.parse import urlsplit

from django.http import HttpResponseRedirect

from kite import crypto

KEY = "kite.once"
TTL_SECONDS = 300  # the redirect is followed at once; a tab closed meanwhile leaves nothing readable for long


def redirect_with(request, url: str, **values) -> HttpResponseRedirect:
    """Redirect to `url`, whose next GET reads `values` (JSON-serialisable) once. Kept per page, so a
    form submitted in another tab meanwhile does not replace what this one is about to show."""
    now = time.time()
    kept = {path: item for path, item in request.session.get(KEY, {}).items()
            if isinstance(item, dict) and now - item.get("at", 0) <= TTL_SECONDS}  # fmt: skip
    kept[urlsplit(url).path] = {"at": now, "data": crypto.encrypt(json.dumps(values))}
    request.session[KEY] = kept
    return HttpResponseRedirect(url)


def take(request) -> dict | None:
    """What a redirect left for this page, removed as it is read; None when nothing (any more)."""
    kept = request.session.get(KEY) if request.method == "GET" else None
    if not isinstance(kept, dict) or not isinstance(kept.get(request.path), dict):
        return None
    item = kept.pop(request.path)
    request.session[KEY] = kept  # re-assigned: the session saves what was removed
    if time.time() - item["at"] > TTL_SECONDS:
        return None
    return json.loads(crypto.decrypt(item["data"]))
