"""The browser voice widget: its script, a demo page, and the demo's own client secrets.

- `GET /widget/parley-voice.js`: the `<parley-voice>` element (agent/widget). Any origin
  may load it: a site embeds it from its Parley server.
- `GET /widget/`: a page that embeds the widget against this server.
- `POST /widget/client-secret`: mints an ephemeral client secret for that page, as an
  embedding site's own endpoint would with its API key. It hands out sessions without a
  key, so it answers only where that gives nothing away: `widget_demo = "auto"` (the
  default) serves it when both ends of the connection are loopback and no proxy forwarded
  the request; `"on"` everywhere (a trusted network); `"off"` never.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from agent.api_keys import principals
from agent.config import Settings
from agent.errors import ConfigError, NotFoundError
from agent.front.body import read_json
from agent.realtime.credentials import create_client_secret

WIDGET_DIR = Path(__file__).resolve().parent.parent / "widget"
DEMO_MODES = ("auto", "on", "off")
DEMO_SECRET_PATH = "/widget/client-secret"
# Headers a reverse proxy adds: behind one, a loopback peer says nothing about the caller.
_FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")


def check_demo_mode(settings: Settings) -> None:
    if settings.widget_demo not in DEMO_MODES:
        raise ConfigError(f"setting 'widget_demo' must be one of {', '.join(DEMO_MODES)}, "
                          f"not {settings.widget_demo!r}")


def _is_loopback(address: tuple[str, int] | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return False


def demo_secrets_allowed(request: Request) -> bool:
    mode = request.app.state.settings.widget_demo
    if mode != "auto":
        return bool(mode == "on")
    scope = request.scope
    forwarded = any(name in _FORWARDING_HEADERS for name, _ in scope.get("headers", []))
    return _is_loopback(scope.get("server")) and _is_loopback(scope.get("client")) \
        and not forwarded


def _asset(name: str) -> bytes:
    return (WIDGET_DIR / name).read_bytes()


async def widget_script(request: Request) -> Response:
    return Response(_asset("parley-voice.js"), media_type="text/javascript",
                    headers={"access-control-allow-origin": "*",
                             "cache-control": "public, max-age=300"})


async def demo_page(request: Request) -> HTMLResponse:
    if demo_secrets_allowed(request):
        demo = f'<parley-voice client-secret-url="{DEMO_SECRET_PATH}"></parley-voice>'
    else:
        demo = ('<p class="note">The demo\'s client secrets are off: this server is not on '
                'loopback. Set <code>PARLEY_WIDGET_DEMO=on</code> on a trusted network, or '
                'embed the widget with your own client-secret endpoint as shown below.</p>')
    page = _asset("index.html").decode().replace("<!--DEMO-->", demo)
    return HTMLResponse(page, headers={"cache-control": "no-store"})


async def redirect_to_demo(request: Request) -> Response:
    return RedirectResponse("/widget/", status_code=308)


async def demo_client_secret(request: Request) -> Response:
    """A client secret as the demo page's own backend would mint it: with the server's
    first API key (or none where authentication is off)."""
    if not demo_secrets_allowed(request):
        raise NotFoundError("The widget demo's client secrets are off on this server "
                            "(setting widget_demo).")
    body = await read_json(request) if await request.body() else {}
    state = request.app.state
    known = principals(state.settings)
    api_key = known[0] if known else None
    return JSONResponse(await create_client_secret(body, state.settings, state.store, api_key),
                        headers={"cache-control": "no-store"})


ROUTES = [
    Route("/widget", redirect_to_demo, methods=["GET"]),
    Route("/widget/", demo_page, methods=["GET"]),
    Route("/widget/parley-voice.js", widget_script, methods=["GET"]),
    Route(DEMO_SECRET_PATH, demo_client_secret, methods=["POST"]),
]
