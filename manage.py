#!/usr/bin/env python
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kite.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    # A bad setting (KITE_PORT=abc, a malformed key), or keys that cannot decrypt what is stored,
    # is one line naming the variable, not a traceback (kite.settings, kite.crypto).
    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        sys.exit(f"kite: {exc}")


if __name__ == "__main__":
    main()
