"""Container health: the server answers HTTP on /info/ (200, or 401 when access control is on)."""

import os
import sys
import urllib.error
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}/info/"
try:
    urllib.request.urlopen(url, timeout=5)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code == 401 else 1)
except OSError:
    sys.exit(1)
