"""Outbound SMS through Twilio's REST API with the `twilio` package's own async client.

`TwilioTransport.send` never blocks the event loop (the SDK's aiohttp client) and maps every
outcome to a SendResult: HTTP 429, 5xx, 401, timeouts and network errors are temporary (the
outbox retries with backoff; the SDK's own retries stay off so a 5xx cannot be re-POSTed
behind our back); other 4xx answers (21211 invalid number, 21610 opted out, ...) are
permanent with Twilio's code. `twilio_api_url` points the client at another server that
speaks the same API (a test double, a regional proxy).
"""

from __future__ import annotations

import base64
import logging
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from handler.config import ConfigError
from handler.transports import SendResult, SmsRequest

# The SDK logs URLs and headers at INFO; handler.logs keeps this logger at WARNING.
_SDK_LOG = logging.getLogger("twilio.http_client")


class ApiHttpClient(AsyncHttpClient):
    """The SDK's HTTP seam, on one aiohttp session: sends to `base_url` instead of
    https://*.twilio.com when given, always with a time limit (the SDK passes none, which
    aiohttp would take as "wait for ever"), and never retries on its own."""

    def __init__(self, base_url: str = "", *, timeout: float = 15.0) -> None:
        super().__init__(_SDK_LOG, True, timeout)
        self._base = urlsplit(base_url.rstrip("/")) if base_url else None
        self._session: aiohttp.ClientSession | None = None
        self._auth: tuple[str, str] | None = None
        self._auth_header = ""

    def rewrite(self, url: str) -> str:
        if self._base is None:
            return url
        parts = urlsplit(url)
        return urlunsplit((self._base.scheme, self._base.netloc, self._base.path + parts.path,
                           parts.query, ""))

    async def request(  # type: ignore[override]
        self, method: str, url: str, params: dict[str, object] | None = None,
        data: dict[str, object] | None = None, headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None, timeout: float | None = None,  # noqa: ASYNC109
        allow_redirects: bool = False,
    ) -> Response:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        sent = dict(headers or {})
        if auth is not None:
            sent["Authorization"] = self._authorization(auth)
        limit = aiohttp.ClientTimeout(total=timeout or self.timeout)
        async with self._session.request(
                method.upper(), self.rewrite(url), params=params, data=data,  # type: ignore[arg-type]
                headers=sent, timeout=limit, allow_redirects=allow_redirects) as response:
            return Response(response.status, await response.text(), response.headers)

    def _authorization(self, auth: tuple[str, str]) -> str:
        """The Basic header for these credentials, encoded once rather than per text."""
        if self._auth != auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            self._auth, self._auth_header = auth, f"Basic {token}"
        return self._auth_header

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


ACCOUNT_ERRORS = frozenset({
    21212,  # the From number is invalid
    21606,  # the From number cannot send messages (to this destination)
    21608,  # a trial account may only text verified numbers
    21611,  # the From number has too many messages queued
    21659,  # the From number is not a Twilio number of this account
})
"""Errors about our account or sending number rather than the message or its recipient:
every text would get the same until the operator fixes the settings, so they are retried."""


def classify_api_error(status: int, code: int | None, message: str) -> SendResult:
    """Twilio's answer to a failed create -> temporary (retry later) or permanent."""
    code_text = str(code) if code else str(status)
    text = f"twilio {status}: {message}"[:500]
    if status == 429 or status >= 500 or status in (401, 404, 408) or code in ACCOUNT_ERRORS:
        # 401, 404 (no such account or messaging service), the sending number: the
        # operator's to fix, and the texts should then go out.
        return SendResult.temporary(text, code_text)
    return SendResult.permanent(text, code_text)


def with_key(callback: str, key: str) -> str:
    """The status callback URL carrying the outbox row's key, so the callback finds its row
    even when it arrives before the dispatcher has recorded Twilio's Message SID."""
    separator = "&" if "?" in callback else "?"
    return f"{callback}{separator}{urlencode({'key': key})}"


class TwilioTransport:
    def __init__(
        self, *, account_sid: str, auth_token: str, sender: str, api_url: str = "",
        timeout: float = 15.0,
    ) -> None:
        if not sender:
            raise ConfigError("twilio_from is required with Twilio credentials: a number "
                              "(+447700900000) or a Messaging Service SID (MG...)")
        self._http = ApiHttpClient(api_url, timeout=timeout)
        self._client = Client(account_sid, auth_token, http_client=self._http)
        self._sender = sender
        where = api_url or "api.twilio.com"
        via = "Messaging Service" if sender.startswith("MG") else "number"
        self.description = f"Twilio ({where}, account {account_sid[:6]}…, from {via} {sender})"

    def _params(self, request: SmsRequest) -> dict[str, Any]:
        params: dict[str, Any] = {"to": request.to, "body": request.body}
        if self._sender.startswith("MG"):
            params["messaging_service_sid"] = self._sender
        else:
            params["from_"] = self._sender
        if request.status_callback:
            params["status_callback"] = with_key(request.status_callback,
                                                 request.idempotency_key)
        return params

    async def send(self, request: SmsRequest) -> SendResult:
        try:
            message = await self._client.messages.create_async(**self._params(request))
        except TwilioRestException as exc:
            return classify_api_error(exc.status, exc.code, exc.msg)
        except TwilioServiceException as exc:
            return classify_api_error(exc.status, exc.code, exc.title)
        except TimeoutError:
            return SendResult.temporary("twilio: no answer in time", "timeout")
        except (aiohttp.ClientError, OSError) as exc:
            return SendResult.temporary(f"twilio: {type(exc).__name__}", "network")
        return SendResult.ok(message.sid or "", status=message.status or "queued")

    async def close(self) -> None:
        await self._http.close()
