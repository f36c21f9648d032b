"""Sessions and CSRF for the labelling app.

The session cookie (HttpOnly, SameSite=Lax, Secure behind HTTPS) holds
"<labeler id>.<issued unix time>.<nonce>.<HMAC-SHA256(secret, first three parts)>"; labeler id 0 is an
anonymous session (the sign-in page). The secret lives in the database, so restarts keep sessions.
A cookie is honoured only while its labeler is active, so removing a labeler ends their sessions.
The CSRF token of a session is HMAC(secret, "csrf:" + nonce); every form carries it and every POST
checks it (the sign-in form too, against the anonymous session). Signing in issues a new nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "alignkit_session"


class NeedSignIn(Exception):
    """No signed-in labeler: answered with a redirect to /login."""


class Forbidden(Exception):
    """Bad CSRF token, or a labeler on an admin page: answered with 403."""


@dataclass
class Session:
    labeler: dict | None
    nonce: str
    csrf: str
    fresh: str | None = None  # a new cookie value to set, when the request had no valid one


def mac(secret: bytes, text: str) -> str:
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def new_cookie(secret: bytes, labeler_id: int) -> str:
    payload = f"{labeler_id}.{int(time.time())}.{secrets.token_urlsafe(16)}"
    return f"{payload}.{mac(secret, payload)}"


def read_cookie(secret: bytes, value: str | None, max_age: float) -> tuple[int, str] | None:
    """(labeler id, 0 = anonymous; nonce) of a valid, unexpired cookie, else None."""
    parts = (value or "").split(".")
    if len(parts) != 4 or not hmac.compare_digest(mac(secret, ".".join(parts[:3])), parts[3]):
        return None
    try:
        labeler_id, issued = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return (labeler_id, parts[2]) if time.time() - issued <= max_age else None


def session_of(secret: bytes, cookie: str | None, max_age: float, find_labeler) -> Session:
    """The request's session; a fresh anonymous one when the cookie is missing, forged, expired or revoked."""
    found = read_cookie(secret, cookie, max_age)
    labeler = find_labeler(found[0]) if found and found[0] else None
    if found is None or (found[0] and labeler is None):
        fresh = new_cookie(secret, 0)
        nonce = fresh.split(".")[2]
        return Session(None, nonce, mac(secret, "csrf:" + nonce), fresh)
    return Session(labeler, found[1], mac(secret, "csrf:" + found[1]))


def check_csrf(s: Session, form: dict[str, list[str]]) -> None:
    sent = form.get("csrf", [""])
    if len(sent) != 1 or not hmac.compare_digest(sent[0].encode(), s.csrf.encode()):
        raise Forbidden()
