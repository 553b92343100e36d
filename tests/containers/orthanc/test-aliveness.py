#!/usr/bin/env python3
"""Orthanc is alive when its REST API answers (200, or 401 with authentication on)."""
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen("http://127.0.0.1:8042/system", timeout=5)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code == 401 else 1)
except OSError:
    sys.exit(1)
