"""OpenAI-compatible HTTP server (`thinkwise serve`): HTTP <-> engine translation only.

`app.py` routes and lifecycle, `protocol.py` the wire format, `serving.py` the mapping to
engine requests and back, `streaming.py` server-sent events, `errors.py` OpenAI-style
errors, `metrics.py` Prometheus metrics.
"""

from thinkwise.server.app import build_app, run_server
from thinkwise.server.serving import ServerSettings

__all__ = ["build_app", "run_server", "ServerSettings"]
