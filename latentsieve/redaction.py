"""Secrets out of text: the one redaction of URLs, for every log line and every answer.

A password travels inside URLs (``redis://user:PASSWORD@host``, ``?password=...``); any text
that may hold one (a configured URL, an exception from a client library) goes through
``redact`` before it is logged or sent to a caller.
"""

from __future__ import annotations

import re

# scheme://userinfo@ : the userinfo runs to the last @ before white space or a quote, so that a
# password holding @ or :// is hidden whole (over-redacting a rare @ in a path is the safe side).
_USERINFO = re.compile(r"""\b([A-Za-z][A-Za-z0-9+.\-]*://)[^\s"'<>]*@""")
# Credentials in a query string (redis-py reads ?password= and ?username=).
_QUERY = re.compile(
    r"""([?&;](?:password|passwd|pwd|pass|username|user|token|secret|api_key)=)[^&;#\s"'<>]*""",
    re.IGNORECASE,
)
HIDDEN = "***"


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    return _QUERY.sub(rf"\g<1>{HIDDEN}", _USERINFO.sub(rf"\g<1>{HIDDEN}@", text))
