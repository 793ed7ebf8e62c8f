"""Container HEALTHCHECK: exit 0 when GET /healthz answers 200 on this container's REST port.

The slim images have no curl; the server's own Python does the request. The port is LOCCA_PORT's, so
the check follows a container started with another port. `python deploy/healthcheck.py /readyz` checks
readiness instead (compose's depends_on: condition: service_healthy uses that).
"""

import os
import sys
import urllib.request

path = sys.argv[1] if len(sys.argv) > 1 else "/healthz"
url = f"http://127.0.0.1:{os.environ.get('LOCCA_PORT', '8000')}{path}"
try:
    with urllib.request.urlopen(url, timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError as e:  # refused, timed out, or an HTTP error status (HTTPError is an OSError)
    print(f"{url}: {e}", file=sys.stderr)
    sys.exit(1)
