#!/usr/bin/env python
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kite.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    from kite import instance_env

    # A bad setting (KITE_PORT=abc, a malformed key), or keys that cannot decrypt what is stored,
    # is one line naming the variable, not a traceback (kite.settings, kite.crypto).
    try:
        argv = instance_env.apply_data_dir_option(sys.argv, os.environ)
        execute_from_command_line(argv)
    except ImproperlyConfigured as exc:
        sys.exit(f"kite: {exc}")


if __name__ == "__main__":
    main()
