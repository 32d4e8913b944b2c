"""`kite listen`: print a team's events, one CloudEvent JSON per line.

Reconnects with backoff and resumes after the last event it printed (the
`kitecursor` of each event), so nothing is lost or printed twice.
Deliberately free of Django: it runs on any machine with this package.
"""

import argparse
import json
import os
import random
import signal
import socket
import ssl
import sys
import threading
import time
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

MAX_BACKOFF_SECONDS = 30.0
FATAL_STATUSES = {400, 401, 403, 404}
TOO_SLOW = 4008  # the server stopped waiting for this client to read: not a failure, resume at once


class Fatal(Exception):
    """A refusal that retrying cannot fix (bad key, bad arguments)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kite", description="Kite command-line client.")
    commands = parser.add_subparsers(dest="command", required=True)
    listen = commands.add_parser("listen", help="stream a team's events to stdout, one JSON per line")
    listen.add_argument("--instance", required=True, help="Kite base URL, e.g. https://kite.example.com")
    listen.add_argument("--source", help="only events from this source (e.g. kite, stripe)")
    listen.add_argument("--type", dest="type_glob", help="only event types matching this glob, e.g. 'com.stripe.*'")
    listen.add_argument("--agent", help="listen as this agent: also receive its agent messages; the agent shows "
                        "in the team's fleet (with this CLI's version and the host name) while it listens")
    listen.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="with --agent: a label of the agent in the fleet (repeatable)")
    listen.add_argument("--api-key", default=os.environ.get("KITE_API_KEY"), help="default: $KITE_API_KEY")
    listen.add_argument("--after", help="start after this cursor (default: only new events)")
    listen.add_argument("--from-start", action="store_true", help="replay every stored event first")
    tls = listen.add_mutually_exclusive_group()
    tls.add_argument("--ca-file", help="PEM file of the CA (or self-signed certificate) to trust")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    listen.add_argument("--max-retries", type=int, default=0, help="give up after N failed connects (0: never)")
    return parser


def stream_url(instance: str, params: dict) -> str:
    parts = urlsplit(instance.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Fatal(f"--instance must be an http(s) URL, got {instance!r}")
    scheme = "wss" if parts.scheme == "https" else "ws"
    query = urlencode({key: value for key, value in params.items() if value}, doseq=True)
    return urlunsplit((scheme, parts.netloc, parts.path + "/ws/events", query, ""))


def ssl_context(args) -> ssl.SSLContext | None:
    if not args.instance.startswith("https"):
        return None
    if args.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=args.ca_file)


def describe_filters(args) -> str:
    shown = [f"{label} {value}" for label, value in (("source", args.source), ("type", args.type_glob),
                                                      ("agent", args.agent)) if value]  # fmt: skip
    return ", ".join(shown) or "every event of the team"


def refusal_text(body: str) -> str:
    """The server's {detail, code} as `code: detail` on one line; any other body as it came."""
    try:
        answer = json.loads(body)
    except ValueError:
        return " ".join(body.split())
    if isinstance(answer, dict) and "code" in answer:
        return f"{answer['code']}: {answer.get('detail', '')}"
    return " ".join(body.split())


def agent_params(args) -> dict:
    """What the fleet shows of this listener: sent with --agent only."""
    if not args.agent:
        return {}
    return {"agent_version": cli_version(), "agent_host": socket.gethostname(), "agent_label": args.label}


def cli_version() -> str:
    try:
        from importlib.metadata import version

        return version("kite")
    except Exception:  # a checkout that was not pip-installed
        return "unknown"


def backoff(attempt: int) -> float:
    return min(MAX_BACKOFF_SECONDS, 0.5 * 2**attempt) * random.uniform(0.8, 1.2)


def current_cursor(instance: str, api_key: str, context) -> str:
    """Where "now" is, so a fresh listener starts with new events only."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        instance.rstrip("/") + "/api/events/head", headers={"Authorization": f"Bearer {api_key}"}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return json.load(response)["cursor"]
    except urllib.error.HTTPError as exc:
        if exc.code in FATAL_STATUSES:
            refusal = refusal_text(exc.read().decode("utf-8", "replace"))
            raise Fatal(f"server refused: HTTP {exc.code} {refusal}") from None
        raise OSError(f"HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise exc.reason from None  # as fatal here as on the WebSocket
        raise


OPEN_TIMEOUT = 10  # seconds for the WebSocket's opening handshake, TLS included


def open_stream(url: str, context, api_key: str, open_timeout: float = OPEN_TIMEOUT):
    """websockets' connect, which never waits much longer than `open_timeout`.

    When the opening handshake fails (a server that never answers it), websockets closes the socket
    and waits for its reading thread. Over TLS that thread can be blocked in a read — after the
    server's session tickets made the socket readable, before any answer — and closing a socket
    wakes no thread blocked on it: connect() then returned only when the server hung up. Each
    connection's socket is kept here under a second descriptor, shut down (which does wake it) a
    second after the handshake's deadline if connect() has not returned by then."""
    handles: list[socket.socket] = []

    class Connection(ClientConnection):
        def __init__(self, sock, protocol, **kwargs):
            handles.append(socket.socket(fileno=os.dup(sock.fileno())))
            super().__init__(sock, protocol, **kwargs)

    def wake() -> None:
        for handle in handles:
            try:
                handle.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the server

    timer = threading.Timer(open_timeout + 1, wake)
    timer.daemon = True
    timer.start()
    try:
        return connect(url, ssl=context, additional_headers={"Authorization": f"Bearer {api_key}"},
                       open_timeout=open_timeout, max_size=16 * 1024 * 1024, create_connection=Connection)  # fmt: skip
    finally:
        timer.cancel()
        for handle in handles:
            handle.close()


def listen(args, out=sys.stdout, err=sys.stderr) -> int:
    if not args.api_key:
        raise Fatal("an API key is required: --api-key or $KITE_API_KEY")
    context = ssl_context(args)
    cursor = args.after or ("0-0" if args.from_start else None)
    failures, listening = 0, False
    while True:
        try:
            if cursor is None:
                cursor = current_cursor(args.instance, args.api_key, context)
            url = stream_url(
                args.instance,
                {"source": args.source, "type": args.type_glob, "agent": args.agent, "after": cursor,
                 **agent_params(args)},  # fmt: skip
            )
            with open_stream(url, context, args.api_key) as websocket:
                if failures:
                    print(f"kite: reconnected, resuming after {cursor}", file=err, flush=True)
                elif not listening:
                    print(f"kite: listening on {args.instance.rstrip('/')} ({describe_filters(args)}); "
                          "events print here, one JSON per line", file=err, flush=True)  # fmt: skip
                failures, listening = 0, True
                for message in websocket:
                    event = json.loads(message)
                    out.write(json.dumps(event, separators=(",", ":")) + "\n")
                    out.flush()
                    cursor = event.get("kitecursor", cursor)
            # The iteration ends quietly on a normal closure (1000/1001, e.g. a proxy going away).
            reason = "server closed the stream"
        except InvalidStatus as exc:
            status = exc.response.status_code
            detail = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
            if status in FATAL_STATUSES:
                raise Fatal(f"server refused the stream: HTTP {status} {refusal_text(detail)}".strip()) from None
            reason = f"HTTP {status}"
        except InvalidURI as exc:
            raise Fatal(str(exc)) from None
        except InvalidHandshake as exc:  # e.g. the server or a proxy hung up mid-handshake while restarting
            reason = f"handshake failed ({exc})"
        except ConnectionClosed as exc:
            if exc.rcvd and 4400 <= exc.rcvd.code < 4500:
                raise Fatal(f"server closed the stream: {exc.rcvd.code} {exc.rcvd.reason}") from None
            if exc.rcvd and exc.rcvd.code == TOO_SLOW:
                # Everything before the close frame was printed: our cursor is where the server stopped.
                print(f"kite: server closed the stream ({TOO_SLOW} {exc.rcvd.reason}); resuming after {cursor}",
                      file=err, flush=True)  # fmt: skip
                continue
            reason = f"connection closed ({exc})"
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise Fatal(f"TLS: {exc.verify_message}; pass --ca-file PEM or --insecure") from None
            reason = str(exc) or exc.__class__.__name__
        failures += 1
        if args.max_retries and failures > args.max_retries:
            print(f"kite: giving up after {failures} failed attempts: {reason}", file=err, flush=True)
            return 1
        delay = backoff(failures - 1)
        print(f"kite: {reason}; retrying in {delay:.1f} s", file=err, flush=True)
        time.sleep(delay)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return listen(args)
    except Fatal as exc:
        print(f"kite: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
