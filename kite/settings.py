"""Kite settings: every knob is an environment variable (README "Configuration").

Embedded defaults (SQLite in WAL mode, Celery on SQLite, in-memory channel
layer) need nothing installed; DATABASE_URL / REDIS_URL switch to PostgreSQL /
Redis. A bad value fails at start with the variable's name.
"""

import ipaddress
import re
from pathlib import Path
from urllib.parse import urlsplit

import environ
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured

from kite import datadir

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()


def _env(name, cast, default):
    try:
        return cast(name, default=default)
    except (ValueError, TypeError, environ.ImproperlyConfigured) as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from exc


def _choice(name, default, choices):
    value = env.str(name, default=default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(sorted(choices))}, got {value!r}")
    return value


def _bool(name, default):
    # env.bool reads any unknown word as False: a typo would silently switch a feature off.
    words = {"on", "off", "true", "false", "yes", "no", "1", "0"}
    return _choice(name, "on" if default else "off", words) in {"on", "true", "yes", "1"}


def _port(name, default):
    raw = env.str(name, default=str(default)).strip()
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ImproperlyConfigured(f"{name} must be a TCP port (1-65535), got {raw!r}")
    return int(raw)


def _positive_int(name, default):
    value = _env(name, env.int, default)
    if value <= 0:
        raise ImproperlyConfigured(f"{name} must be a positive integer, got {value}")
    return value


KITE_DATA_DIR = Path(env.str("KITE_DATA_DIR", default=str(BASE_DIR / "var"))).resolve()
try:
    datadir.ensure_dir(KITE_DATA_DIR)
except OSError as exc:
    raise ImproperlyConfigured(f"KITE_DATA_DIR: cannot create {KITE_DATA_DIR}: {exc}") from exc

KITE_HOST = env.str("KITE_HOST", default="127.0.0.1")
KITE_PORT = _port("KITE_PORT", 8443)
KITE_TLS = _choice("KITE_TLS", "on", {"on", "off"}) == "on"
_scheme = "https" if KITE_TLS else "http"
_url_host = f"[{KITE_HOST}]" if ":" in KITE_HOST else KITE_HOST
KITE_PUBLIC_URL = env.str("KITE_PUBLIC_URL", default=f"{_scheme}://{_url_host}:{KITE_PORT}").rstrip("/")
if urlsplit(KITE_PUBLIC_URL).scheme not in ("http", "https") or not urlsplit(KITE_PUBLIC_URL).hostname:
    raise ImproperlyConfigured(f"KITE_PUBLIC_URL must be an absolute http(s) URL, got {KITE_PUBLIC_URL!r}")

KITE_INSTANCE_ID = env.str("KITE_INSTANCE_ID", default="") or datadir.persistent_value(
    KITE_DATA_DIR, "instance-id", datadir.new_instance_id
)
if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", KITE_INSTANCE_ID):
    raise ImproperlyConfigured(
        f"KITE_INSTANCE_ID must be 1-63 letters, digits, '.', '_' or '-', got {KITE_INSTANCE_ID!r}"
    )

SECRET_KEY = env.str("SECRET_KEY", default="") or datadir.persistent_value(
    KITE_DATA_DIR, "secret-key", datadir.new_secret_key
)
# Unset, the keys are read from this file (a key generated on first start); kite.crypto names both
# when the keys cannot decrypt what is stored.
KITE_ENCRYPTION_KEYS_FILE = KITE_DATA_DIR / "encryption-keys"
KITE_ENCRYPTION_KEYS_FROM_ENV = bool(env.str("KITE_ENCRYPTION_KEYS", default="").strip())
KITE_ENCRYPTION_KEYS = [
    key.strip()
    for key in (
        env.str("KITE_ENCRYPTION_KEYS", default="").strip()
        or datadir.persistent_value(KITE_DATA_DIR, "encryption-keys", datadir.new_fernet_key)
    ).split(",")
    if key.strip()
]
if not KITE_ENCRYPTION_KEYS:
    raise ImproperlyConfigured("KITE_ENCRYPTION_KEYS must hold at least one Fernet key")
for _number, _key in enumerate(KITE_ENCRYPTION_KEYS, start=1):
    try:
        Fernet(_key.encode())
    except ValueError as exc:  # say which key, never the key itself
        _origin = "" if KITE_ENCRYPTION_KEYS_FROM_ENV else f" (unset: read from {KITE_ENCRYPTION_KEYS_FILE})"
        raise ImproperlyConfigured(
            f"KITE_ENCRYPTION_KEYS{_origin}: key #{_number} is not a Fernet key ({exc})"
        ) from None

DEBUG = _bool("KITE_DEBUG", False)
ALLOWED_HOSTS = ["*"]  # Kite is reached by IP, by name and through proxies; Host is never trusted for URLs.
CSRF_TRUSTED_ORIGINS = [f"{urlsplit(KITE_PUBLIC_URL).scheme}://{urlsplit(KITE_PUBLIC_URL).netloc}"]

# --- Cookies, HSTS, proxies, /metrics -------------------------------------------------
# Browsers reach Kite over HTTPS when it serves TLS itself or sits behind a TLS proxy (an https
# KITE_PUBLIC_URL): its session and CSRF cookies must then never travel in clear.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = KITE_TLS or urlsplit(KITE_PUBLIC_URL).scheme == "https"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = CSRF_COOKIE_SAMESITE = "Lax"
KITE_HSTS_SECONDS = _env("KITE_HSTS_SECONDS", env.int, 0)  # SecurityMiddleware sends it on HTTPS only
if KITE_HSTS_SECONDS < 0:
    raise ImproperlyConfigured(f"KITE_HSTS_SECONDS must be 0 (off) or more, got {KITE_HSTS_SECONDS}")
SECURE_HSTS_SECONDS = KITE_HSTS_SECONDS


def _networks(name):
    """Comma-separated IPs and CIDRs. A typo must stop Kite: read as nothing, it would silently
    refuse the peers it was meant to allow; passed on to uvicorn, it would be a host name that never
    matches (or "*" for everyone)."""
    networks = []
    for item in filter(None, (part.strip() for part in env.str(name, default="").split(","))):
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name}: {item!r} is not an IP address or network ({exc})") from None
    return tuple(networks)


# X-Forwarded-For / -Proto are believed only from these peers (runkite passes them to uvicorn, which
# rewrites the client address and scheme); empty: from nobody, not even loopback. There is no
# SECURE_PROXY_SSL_HEADER: Django would believe X-Forwarded-Proto from any client.
KITE_TRUSTED_PROXIES = [str(network) for network in _networks("KITE_TRUSTED_PROXIES")]
# Unset: /metrics answers loopback callers only. Label values name every team's peers and sources.
KITE_METRICS_TOKEN = env.str("KITE_METRICS_TOKEN", default="").strip()
if KITE_METRICS_TOKEN and not re.fullmatch(r"[\x21-\x7e]{16,}", KITE_METRICS_TOKEN):
    raise ImproperlyConfigured("KITE_METRICS_TOKEN must be at least 16 printable characters without spaces")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "kite",
    "ingest",
    "federation",
    "fleet",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "kite.middleware.OutageMiddleware",
]

ROOT_URLCONF = "kite.urls"
WSGI_APPLICATION = "kite.wsgi.application"
ASGI_APPLICATION = "kite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# --- Database ---------------------------------------------------------------
_default_db = f"sqlite:///{KITE_DATA_DIR / 'kite.sqlite3'}"
try:
    DATABASES = {"default": env.db("DATABASE_URL", default=_default_db)}
except (ValueError, KeyError, environ.ImproperlyConfigured) as exc:
    raise ImproperlyConfigured(f"DATABASE_URL: {exc}") from exc
_engine = DATABASES["default"].get("ENGINE")  # missing for a URL scheme django-environ does not know
if _engine == "django.db.backends.sqlite3":
    # WAL lets readers run beside the one writer; IMMEDIATE takes the write lock
    # up front so concurrent writers wait (busy timeout) instead of failing.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
    }
elif _engine in ("django.db.backends.postgresql", "django.db.backends.postgresql_psycopg2"):
    DATABASES["default"]["ENGINE"] = "kite.postgres"  # Django's, with a cheaper health check
    DATABASES["default"]["CONN_MAX_AGE"] = _env("KITE_DB_CONN_MAX_AGE", env.int, 600)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # Parameters bound by the server, and statements a connection runs often prepared once
    # (psycopg's prepare_threshold): less parsing and planning per webhook (bench/RESULTS.md).
    DATABASES["default"].setdefault("OPTIONS", {})["server_side_binding"] = True
    # Django turns psycopg's prepared statements off (prepare_threshold=None) unless asked: every
    # webhook's INSERT was then planned anew (pg_stat_statements: plans == calls, 0.28 ms of
    # planning for the guarded INSERT, more than its execution). Prepared after 5 uses per
    # connection. Set KITE_DB_PREPARE_THRESHOLD=0 behind a transaction-pooling proxy (PgBouncer).
    _prepare = _env("KITE_DB_PREPARE_THRESHOLD", env.int, 5)
    if _prepare < 0:
        raise ImproperlyConfigured(f"KITE_DB_PREPARE_THRESHOLD must be 0 (off) or more, got {_prepare}")
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = _prepare or None
else:
    raise ImproperlyConfigured(f"DATABASE_URL must be a postgres:// or sqlite:// URL, got engine {_engine}")
IS_POSTGRES = DATABASES["default"]["ENGINE"] == "kite.postgres"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: broker, cache, channel layer --------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL and urlsplit(REDIS_URL).scheme not in ("redis", "rediss", "unix"):
    raise ImproperlyConfigured(f"REDIS_URL must be a redis://, rediss:// or unix:// URL, got {REDIS_URL!r}")

if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    # A listener's channel is read with BZPOPMIN, which Redis answers after 5 s when idle: redis-py's
    # default 5 s socket timeout raced that answer and ended idle WebSocket streams every few seconds.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15}], "capacity": 1000},
        }
    }
    CELERY_BROKER_URL = REDIS_URL
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CELERY_BROKER_URL = f"sqla+sqlite:///{KITE_DATA_DIR / 'celery-broker.sqlite3'}"

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 4
# Celery closes Django's database connections around every task unless this is set: a new
# PostgreSQL connection (~5 ms here) per delivery task. Reuse them, recycled every 1,000 tasks;
# kite.celery checks them before each task as a request would (CONN_MAX_AGE, health check).
CELERY_DB_REUSE_MAX = 1000
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(KITE_DATA_DIR / "celerybeat-schedule")
# A broker outage never ends a worker or beat: they retry every 2, 4 … 30 s for as long as it lasts
# (Celery's default gives up after 100 attempts, about 45 minutes, and the process exits).
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
KITE_HEARTBEAT_SECONDS = _positive_int("KITE_HEARTBEAT_SECONDS", 30)
KITE_PROBE_DOWN_SECONDS = _positive_int("KITE_PROBE_DOWN_SECONDS", 5)
# How long a claimed outbox entry stays a worker's without a renewal. The delivering worker renews
# it every quarter of this while it works (however long the peer takes), so a worker that dies
# leaves its entries to be retried this long after its last renewal at most (plus the 1 s sweep).
KITE_OUTBOX_LEASE_SECONDS = _positive_int("KITE_OUTBOX_LEASE_SECONDS", 5)
if not 3 <= KITE_OUTBOX_LEASE_SECONDS <= 3600:
    raise ImproperlyConfigured(f"KITE_OUTBOX_LEASE_SECONDS must be between 3 and 3600, got {KITE_OUTBOX_LEASE_SECONDS}")
# Calls in flight at once to one peer that takes one event per POST (no batches): each its own
# connection; outcomes recorded together. 1: one call at a time.
KITE_OUTBOX_IN_FLIGHT = _positive_int("KITE_OUTBOX_IN_FLIGHT", 4)
if KITE_OUTBOX_IN_FLIGHT > 32:
    raise ImproperlyConfigured(f"KITE_OUTBOX_IN_FLIGHT must be between 1 and 32, got {KITE_OUTBOX_IN_FLIGHT}")


# Peer URLs may resolve to these beyond public addresses (federation.client's destination policy);
# two instances on one machine: 127.0.0.0/8,::1/128.
KITE_PEER_ALLOWED_NETWORKS = _networks("KITE_PEER_ALLOWED_NETWORKS")
# Audit events and delivery attempts older than this are purged daily; 0 keeps them forever.
KITE_AUDIT_RETENTION_DAYS = _env("KITE_AUDIT_RETENTION_DAYS", env.int, 90)
if KITE_AUDIT_RETENTION_DAYS < 0:
    raise ImproperlyConfigured(
        f"KITE_AUDIT_RETENTION_DAYS must be 0 (keep forever) or more, got {KITE_AUDIT_RETENTION_DAYS}"
    )
# Identity certificates: a team's newest one is renewed this many days before it expires (and its
# peers with a signed channel told); 0 turns automatic renewal off. The screens warn as early.
KITE_CERTIFICATE_RENEW_DAYS = _env("KITE_CERTIFICATE_RENEW_DAYS", env.int, 14)
if not 0 <= KITE_CERTIFICATE_RENEW_DAYS <= 365:
    raise ImproperlyConfigured(
        f"KITE_CERTIFICATE_RENEW_DAYS must be 0 (off) to 365 days, got {KITE_CERTIFICATE_RENEW_DAYS}"
    )
CELERY_BEAT_SCHEDULE = {
    "purge-old-events": {"task": "ingest.tasks.events_purge_expired", "schedule": 3600.0},
    "sweep-outbox": {"task": "federation.tasks.sweep_outbox", "schedule": 1.0},
    "heartbeats": {"task": "federation.tasks.heartbeats", "schedule": float(KITE_HEARTBEAT_SECONDS)},
    # A peer whose queue paused as down is probed more often, so it drains soon after it is back.
    "probe-down-peers": {"task": "federation.tasks.probe_down_peers", "schedule": float(KITE_PROBE_DOWN_SECONDS)},
    "purge-audit-and-deliveries": {"task": "federation.tasks.retention_purge", "schedule": 24 * 3600.0},
    # As often as heartbeats: a peer that was down is told a renewed certificate soon after it is back.
    "certificates": {"task": "federation.tasks.certificates_check", "schedule": float(KITE_HEARTBEAT_SECONDS)},
}
if not REDIS_URL:  # the embedded broker keeps every message it delivered (kite.broker)
    CELERY_BEAT_SCHEDULE["purge-consumed-broker-messages"] = {"task": "kite.tasks.broker_purge_consumed",
                                                              "schedule": 30.0}  # fmt: skip

# --- Ingest ------------------------------------------------------------------
KITE_MAX_BODY_BYTES = _positive_int("KITE_MAX_BODY_BYTES", 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = KITE_MAX_BODY_BYTES
# on: a web process delivers the events it has just stored itself when the peer keeps up
# (federation.courier): lower latency at low rates, a higher p99 at 200 events/s on a 2-core machine
# (bench/RESULTS.md). off: every delivery goes through a worker's task. PostgreSQL only.
KITE_WEB_DELIVERY = _bool("KITE_WEB_DELIVERY", False)
# on: a web process stores the common webhook on its event loop, without a thread or Django's request
# handling (ingest.edge), and serves every other one through Django as before. PostgreSQL only.
KITE_LOOP_INGEST = _bool("KITE_LOOP_INGEST", True)
KITE_EVENT_RETENTION_DAYS = _env("KITE_EVENT_RETENTION_DAYS", env.int, 0)  # 0 keeps events forever
if KITE_EVENT_RETENTION_DAYS < 0:
    raise ImproperlyConfigured(
        f"KITE_EVENT_RETENTION_DAYS must be 0 (keep forever) or more, got {KITE_EVENT_RETENTION_DAYS}"
    )
# Each uvicorn worker runs Python on one core at a time (GIL): with Redis carrying the channel
# layer, two workers serve ~1.4x the webhooks of one on 2 cores (bench/RESULTS.md, ab-workers).
KITE_WEB_WORKERS = _positive_int("KITE_WEB_WORKERS", 2 if REDIS_URL else 1)
# Threads per web process running Django (kite.bridge). Each takes turns with the event loop for the
# GIL: on 2 cores 4 served ~1.3x the webhooks of 16 at ~0.8x the CPU per webhook, with a lower tail
# at 800/s (bench/RESULTS.md, "Threads and the GIL"). A request waiting on a slow peer (a handshake,
# a fleet list) holds its thread: raise it where operators' calls to unreachable peers queue others.
KITE_WSGI_THREADS = _positive_int("KITE_WSGI_THREADS", 4)
if KITE_WEB_WORKERS > 1 and not REDIS_URL:
    raise ImproperlyConfigured("KITE_WEB_WORKERS > 1 needs REDIS_URL (the in-memory channel layer is per process)")


# --- Fleet (README "The fleet across instances") --------------------------------
def _seconds(name, default, low, high):
    raw = env.str(name, default=str(default)).strip()
    try:
        value = float(raw)  # not env.float: it drops letters, so "2s" or "2m" would read as 2
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number of seconds, got {raw!r}") from None
    if not low <= value <= high:
        raise ImproperlyConfigured(f"{name} must be between {low} and {high} seconds, got {value}")
    return value


# Offline once not seen for this long. A connected `kite listen` re-announces itself every
# 30-35 s (ingest.consumers), so the window leaves room for one missed announcement.
KITE_AGENT_OFFLINE_SECONDS = int(_seconds("KITE_AGENT_OFFLINE_SECONDS", 90, 60, 7 * 24 * 3600))
KITE_FLEET_PEER_TIMEOUT_SECONDS = _seconds("KITE_FLEET_PEER_TIMEOUT_SECONDS", 2.0, 0.1, 60)
KITE_FLEET_DEADLINE_SECONDS = _seconds("KITE_FLEET_DEADLINE_SECONDS", KITE_FLEET_PEER_TIMEOUT_SECONDS + 1, 0.2, 120)
if KITE_FLEET_DEADLINE_SECONDS <= KITE_FLEET_PEER_TIMEOUT_SECONDS:
    raise ImproperlyConfigured(
        f"KITE_FLEET_DEADLINE_SECONDS ({KITE_FLEET_DEADLINE_SECONDS}) must be above "
        f"KITE_FLEET_PEER_TIMEOUT_SECONDS ({KITE_FLEET_PEER_TIMEOUT_SECONDS})"
    )
KITE_FLEET_REFRESH_SECONDS = _positive_int("KITE_FLEET_REFRESH_SECONDS", 30)
CELERY_BEAT_SCHEDULE["fleet-snapshots"] = {
    "task": "fleet.tasks.refresh_snapshots",
    "schedule": float(KITE_FLEET_REFRESH_SECONDS),
}

# --- API ---------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "kite.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["kite.auth.IsTeamMember"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "kite.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "kite.schema.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Kite API",
    "DESCRIPTION": "Webhooks in, CloudEvents out, federated between Kite instances. Admin calls take "
    "`Authorization: Bearer <api key>`; the `peer-facing` operations are what other Kite instances call, signed "
    "with Standard Webhooks headers. Every error is `{detail, code}`.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # kite/schema.py: the plain views peers and providers call, the bearer scheme, the error shape.
    "DEFAULT_GENERATOR_CLASS": "kite.schema.Generator",
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "kite.schema.postprocess"],
    "COMPONENT_SPLIT_REQUEST": True,  # a field read-only in answers is not asked for in requests
    "SCHEMA_PATH_PREFIX": r"/api/",
    "ENUM_NAME_OVERRIDES": {  # several answers have a `status`: each its own enum
        "PeerStatusEnum": "federation.models.Peer.Status",
        "OutboxStatusEnum": "federation.models.OutboxEntry.Status",
        "AgentStatusEnum": ["online", "offline"],
        "SourceKindEnum": "ingest.models.Source.Kind",
    },
    "TAGS": [
        {"name": "peer-facing", "description": "Called by other Kite instances (and webhook providers), signed; "
         "not with an API key."},
    ],
}

# --- Static, auth, i18n --------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = KITE_DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
datadir.ensure_dir(STATIC_ROOT)
WHITENOISE_USE_FINDERS = True
LOGIN_URL = "/login/"  # the browser screens; the admin keeps its own login
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

KITE_LOG_LEVEL = _choice("KITE_LOG_LEVEL", "info", {"debug", "info", "warning", "error", "critical"}).upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": KITE_LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

KITE_BENCH_ENDPOINTS = _bool("KITE_BENCH_ENDPOINTS", False)
if KITE_BENCH_ENDPOINTS:  # at every start of every process; logging is not set up yet: Python's last resort, stderr
    import logging as _logging

    _logging.getLogger("kite.settings").warning(
        "KITE_BENCH_ENDPOINTS is on: /bench/bare/{team}/{source} stores events for any team with no signature "
        "check (benchmark baselines, kite/bench_endpoints.py). Never on an instance anyone else can reach."
    )

try:
    from importlib.metadata import version as _package_version

    KITE_VERSION = _package_version("kite")
except Exception:  # running from a checkout that was not pip-installed
    KITE_VERSION = "0.1.0"

# --- Tracing (kite/tracing.py) -------------------------------------------------
# On when the standard OTEL_EXPORTER_OTLP_ENDPOINT is set; read here so that a protocol Kite cannot
# export over stops every process at start, naming the variable.
import os as _os  # noqa: E402

from kite import tracing as _tracing  # noqa: E402

KITE_TRACING = _tracing.configured(_os.environ)
