"""Test doubles on loopback for the Twilio side: a server that answers as Twilio's Messages
API does (201 with a message JSON, 4xx with a Twilio error JSON, 5xx), and helpers that sign
webhook requests with the `twilio` package's own RequestValidator, as Twilio does."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import urlsplit, urlunsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from twilio.request_validator import RequestValidator

ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "test-auth-token-0123456789abcdef"
OUR_NUMBER = "+447700900000"
PUBLIC_URL = "https://handler.example.test"
"""What Twilio is told to call (a tunnel or proxy in front of the service)."""


def new_sid(prefix: str = "SM") -> str:
    return prefix + uuid.uuid4().hex


def sign(url: str, form: Mapping[str, str], token: str = AUTH_TOKEN) -> str:
    """X-Twilio-Signature for a POST of `form` to `url`, computed by the twilio package."""
    return RequestValidator(token).compute_signature(url, dict(form))


@dataclass
class Answer:
    """One programmed answer of the fake API."""

    status: int = 201
    code: int | None = None
    message: str = ""
    delay: float = 0.0


ERRORS = {
    21211: (400, "Invalid 'To' Phone Number"),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    20429: (429, "Too Many Requests"),
    20500: (500, "Internal Server Error"),
    20003: (401, "Authenticate"),
}


def error(code: int, delay: float = 0.0) -> Answer:
    status, message = ERRORS[code]
    return Answer(status, code, message, delay)


@dataclass
class FakeTwilio:
    """POST /2010-04-01/Accounts/{AccountSid}/Messages.json, as Twilio answers it."""

    account_sid: str = ACCOUNT_SID
    auth_token: str = AUTH_TOKEN
    answers: list[Answer] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    created: list[dict[str, object]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/2010-04-01/Accounts/{sid}/Messages.json",
                                       self.create_message, methods=["POST"])])

    async def create_message(self, request: Request) -> JSONResponse:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if (request.headers.get("authorization") != f"Basic {expected}"
                or request.path_params["sid"] != self.account_sid):
            return self._error(error(20003))
        form = await request.form()
        self.requests.append({k: str(v) for k, v in form.items()})
        answer = self.answers.pop(0) if self.answers else Answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.status >= 300:
            return self._error(answer)
        sid = new_sid()
        now = formatdate(usegmt=True)
        base = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}"
        message: dict[str, object] = {
            "account_sid": self.account_sid, "api_version": "2010-04-01",
            "body": form.get("Body"), "date_created": now, "date_sent": None,
            "date_updated": now, "direction": "outbound-api", "error_code": None,
            "error_message": None, "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"), "num_media": "0",
            "num_segments": "1", "price": None, "price_unit": "USD", "sid": sid,
            "status": "accepted" if form.get("MessagingServiceSid") else "queued",
            "subresource_uris": {"media": f"{base}/Media.json"}, "to": form.get("To"),
            "uri": f"{base}.json",
        }
        self.created.append(message)
        return JSONResponse(message, status_code=201)

    def _error(self, answer: Answer) -> JSONResponse:
        body = {"code": answer.code, "message": answer.message,
                "more_info": f"https://www.twilio.com/docs/errors/{answer.code}",
                "status": answer.status}
        return JSONResponse(body, status_code=answer.status)


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[int]:
    """Run `app` on 127.0.0.1 on a port the OS picks; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = _QuietServer(uvicorn.Config(app, log_config=None, access_log=False,
                                         lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def local(url: str, port: int) -> str:
    """The public URL Twilio would call, delivered instead to the service on `port`."""
    parts = urlsplit(url)
    return urlunsplit(("http", f"127.0.0.1:{port}", parts.path, parts.query, ""))


async def post_signed(
    port: int, public_url: str, form: Mapping[str, str], *, signature: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """POST `form` to the service as Twilio does: signed for `public_url` (or with the given
    signature; "" sends none), delivered to the local port."""
    sent_headers = dict(headers or {})
    if signature is None:
        signature = sign(public_url, form)
    if signature:
        sent_headers["X-Twilio-Signature"] = signature
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(local(public_url, port), data=dict(form), headers=sent_headers)


def inbound_form(
    body: str, *, sender: str = "+447700900123", sid: str | None = None,
    media: Sequence[tuple[str, str]] = (), extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The fields Twilio posts for an inbound SMS (MMS when `media` is given)."""
    sid = sid or new_sid("SM" if not media else "MM")
    form = {
        "ToCountry": "GB", "ToState": "", "SmsMessageSid": sid, "NumMedia": str(len(media)),
        "ToCity": "", "FromZip": "", "SmsSid": sid, "FromState": "", "SmsStatus": "received",
        "FromCity": "", "Body": body, "FromCountry": "GB", "To": OUR_NUMBER,
        "MessagingServiceSid": "", "ToZip": "", "NumSegments": "1", "MessageSid": sid,
        "AccountSid": ACCOUNT_SID, "From": sender, "ApiVersion": "2010-04-01",
    }
    for n, (url, content_type) in enumerate(media):
        form[f"MediaUrl{n}"] = url
        form[f"MediaContentType{n}"] = content_type
    form.update(extra or {})
    return form


def status_form(sid: str, status: str, *, to: str = "+447700900123",
                error_code: str = "") -> dict[str, str]:
    form = {"MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
            "AccountSid": ACCOUNT_SID, "From": OUR_NUMBER, "To": to,
            "ApiVersion": "2010-04-01"}
    if error_code:
        form["ErrorCode"] = error_code
    return form
