"""Safe by default: loopback Host check (DNS rebinding), a token off loopback, same-Origin state changes."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from urllib.parse import urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse

TOKEN_COOKIE = "dsft_ui_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _host_name(host_header: str) -> str:
    return urlsplit(f"//{host_header}").hostname or ""


class Guard(BaseHTTPMiddleware):
    """Every request: Host must be loopback when bound to loopback; the token when one is set; Origin on writes."""

    def __init__(self, app, *, token: str | None, loopback: bool):
        super().__init__(app)
        self.token = token
        self.loopback = loopback

    def _has_token(self, request: Request) -> bool:
        if not self.token:
            return True
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE, "")
        given = given or request.query_params.get("token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def dispatch(self, request: Request, call_next):
        host = request.headers.get("host", "")
        if self.loopback and not is_loopback(_host_name(host)):
            # a page on another site resolving its own name to 127.0.0.1 (DNS rebinding) must not reach the runs
            return PlainTextResponse(f"dsft ui: Host {host!r} refused (this dashboard answers on loopback only)", 403)
        if not self._has_token(request):
            return PlainTextResponse("dsft ui: a token is required: open the URL that `dsft ui` printed "
                                     "(…/?token=…) or send 'Authorization: Bearer TOKEN'", 401)
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("origin")
            fetch_site = request.headers.get("sec-fetch-site")
            if origin is not None and urlsplit(origin).netloc != host:
                return JSONResponse({"error": f"Origin {origin!r} refused: state changes come from this dashboard only"}, 403)
            if origin is None and fetch_site not in (None, "same-origin", "none"):
                return JSONResponse({"error": "cross-site request refused"}, 403)
        if self.token and request.query_params.get("token") and request.method in SAFE_METHODS:
            # the printed URL carries the token once; from then on it is an HttpOnly same-site cookie
            clean = request.url.remove_query_params("token")
            resp = RedirectResponse(str(clean.replace(scheme=request.url.scheme)), 303)
            resp.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
            return resp
        return await call_next(request)
