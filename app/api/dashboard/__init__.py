"""/dashboard: the operators' view, server-rendered and refreshed by a small script.

sessions.py signs operators in (cookie, server-side session rows, CSRF tokens),
chart.py computes the chart's geometry, routes.py serves the pages and forms.
"""

from app.api.dashboard.routes import install, router
from app.api.dashboard.sessions import COOKIE, SESSION_SECONDS, new_session, open_session

__all__ = ["COOKIE", "SESSION_SECONDS", "install", "new_session", "open_session", "router"]
