"""The Twilio webhooks: `POST /sms/twilio` (inbound texts) and `POST /sms/twilio/status`
(delivery status callbacks), both checked with `X-Twilio-Signature`.

Signatures are computed over the configured public URL (`public_url` + path + query as
received), never over what the request claims its host is, so they hold behind a proxy or a
tunnel and cannot be steered by X-Forwarded-* headers. A bad or missing signature gets 403
and nothing is stored. An inbound text gets its empty TwiML 200 only after `Intake.accept`
has committed it; Twilio's retry of the same MessageSid is stored once.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qsl

from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import FormData
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from handler.clock import Clock
from handler.config import Settings
from handler.logs import pseudonym
from handler.parse_sms import SmsParseError, parse_sms
from handler.service import Acceptor
from handler.sms_status import StatusUpdate, parse_status, record_status

log = logging.getLogger("handler.sms")

INBOUND_PATH = "/sms/twilio"
STATUS_PATH = "/sms/twilio/status"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
MAX_FORM_BYTES = 64 * 1024  # an inbound SMS form is a few KB; media are URLs
MAX_FORM_FIELDS = 200
ACCEPT_TIMEOUT = 10.0  # Twilio gives up after 15 s


def startup_warnings(settings: Settings) -> list[str]:
    """What an operator must be told loudly (on stderr) when the service starts."""
    if settings.twilio_validate_signatures:
        return []
    return [
        "WARNING: Twilio signature checking is OFF (HANDLER_TWILIO_VALIDATE_SIGNATURES=false).",
        f"WARNING: anyone who can reach {settings.public_url.rstrip('/')}{INBOUND_PATH} can "
        "create enquiries and opt numbers out. Development only.",
    ]


def describe(settings: Settings) -> str:
    base = settings.public_url.rstrip("/")
    if not settings.twilio_validate_signatures:
        check = "SIGNATURES NOT CHECKED"
    elif not settings.twilio_auth_token:
        check = "no HANDLER_TWILIO_AUTH_TOKEN: every request gets 403"
    else:
        check = "signatures checked against that URL"
    return f"sms    webhook POST {base}{INBOUND_PATH}, status {base}{STATUS_PATH} ({check})"


async def _read_body(request: Request, limit: int) -> bytes | Response:
    """The body, read as it comes, up to `limit` bytes: a chunked request has no
    Content-Length to refuse it by, and nothing is parsed before the signature is checked."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return Response(status_code=413)
    except ClientDisconnect:
        return Response(status_code=400)
    return bytes(body)


def signed_url(public_url: str, path: str, query: str) -> str:
    """The URL Twilio signed: our configured public base, the path and the query as received."""
    url = public_url.rstrip("/") + path
    return f"{url}?{query}" if query else url


class SmsWebhook:
    def __init__(
        self, *, settings: Settings, intake: Acceptor, sessions: sessionmaker[Session],
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._intake = intake
        self._sessions = sessions
        self._clock = clock
        self._validator = RequestValidator(settings.twilio_auth_token)

    def routes(self) -> list[Route]:
        return [Route(INBOUND_PATH, self.inbound, methods=["POST"]),
                Route(STATUS_PATH, self.status, methods=["POST"])]

    async def _signed_form(self, request: Request) -> FormData | Response:
        """The request's form when it is authentic; otherwise the response to give."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
            return Response(status_code=413)
        if not request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"):
            return Response(status_code=415)
        body = await _read_body(request, MAX_FORM_BYTES)
        if isinstance(body, Response):
            return body
        try:  # as Starlette's form parser decodes it (latin-1, then %-escapes as UTF-8)
            form = FormData(parse_qsl(body.decode("latin-1"), keep_blank_values=True,
                                      errors="replace", max_num_fields=MAX_FORM_FIELDS))
        except ValueError:  # more fields than that
            return Response(status_code=400)
        if not self._settings.twilio_validate_signatures:
            return form
        signature = request.headers.get("x-twilio-signature", "")
        if not signature or not self._settings.twilio_auth_token:
            log.warning("%s refused: %s", request.url.path,
                        "no X-Twilio-Signature" if signature == "" else "no auth token set")
            return Response(status_code=403)
        url = signed_url(self._settings.public_url, request.url.path, request.url.query)
        if not self._validator.validate(url, form, signature):
            log.warning("%s refused: signature does not match %s", request.url.path, url)
            return Response(status_code=403)
        return form

    async def inbound(self, request: Request) -> Response:
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        try:
            msg = parse_sms(form)  # type: ignore[arg-type]
        except SmsParseError as exc:
            log.warning("%s: %s", INBOUND_PATH, exc)
            return Response(status_code=400)
        try:
            async with asyncio.timeout(ACCEPT_TIMEOUT):
                outcome = await self._intake.accept(msg)
        except Exception as exc:
            # Not stored. Twilio retries an inbound webhook only if the number's webhook URL
            # asks for it (connection overrides); see README "SMS".
            log.error("sms from %s not stored: %s", pseudonym(msg.sender), type(exc).__name__)
            return Response(status_code=503 if isinstance(exc, TimeoutError) else 500)
        log.debug("sms %s stored (%s%s)", msg.external_id, outcome.kind,
                  ", duplicate" if outcome.duplicate else "")
        return Response(EMPTY_TWIML, media_type="text/xml")

    async def status(self, request: Request) -> Response:
        form = await self._signed_form(request)
        if isinstance(form, Response):
            return form
        try:
            update = parse_status(form, request.query_params.get("key", ""))  # type: ignore[arg-type]
        except ValueError as exc:
            log.warning("%s: %s", STATUS_PATH, exc)
            return Response(status_code=400)
        try:
            await asyncio.to_thread(self._record, update)
        except Exception as exc:
            log.error("status callback not recorded: %s", type(exc).__name__)
            return Response(status_code=500)
        return Response(status_code=204)

    def _record(self, update: StatusUpdate) -> bool:
        with self._sessions() as session, session.begin():
            return record_status(session, update, self._clock.now())
