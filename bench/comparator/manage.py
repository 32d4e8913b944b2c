#!/usr/bin/env python
"""The comparator project's manage.py (bench/comparator.py runs it with its own venv)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "comparator.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
