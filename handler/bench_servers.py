"""The bare baselines `scripts/bench` compares against, each run as its own process:
`bare-smtp` (aiosmtpd answering 250 and nothing else), `sink` (an aiosmtpd relay sink that
counts, timestamps and optionally keeps what it receives), `replay` (a plain aiosmtplib loop
sending saved messages over N connections), and on the service's own HTTP stack (uvicorn,
Starlette) `bare-http` (empty TwiML, nothing else) and `signed-http` (form parsing and
Twilio's RequestValidator, then empty TwiML).
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import signal
import time
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SIZE_LIMIT = 25 * 1024 * 1024


class BareHandler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok: queued"


class SinkHandler:
    """Counts messages; prints "received N in S s" once `expect` have arrived."""

    def __init__(self, *, expect: int, keep: bool) -> None:
        self.expect = expect
        self.keep = keep
        self.count = 0
        self.first = self.last = 0.0
        self.messages: list[tuple[str, bytes]] = []
        self.ids: set[bytes] = set()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.perf_counter()
        data = envelope.original_content or b""
        self.count += 1
        if self.count == 1:
            self.first = now
        self.last = now
        self.ids.add(_message_id(data))
        if self.keep:
            self.messages.append((envelope.rcpt_tos[0], data))
        if self.count == self.expect:
            print(f"received {self.count} distinct {len(self.ids)} in "
                  f"{self.last - self.first:.6f} s", flush=True)
        return "250 2.0.0 Ok: kept"


def _message_id(data: bytes) -> bytes:
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[:11].lower() == b"message-id:":
            return line[11:].strip()
    return b""


async def serve_smtp(handler: object, port: int, until: asyncio.Event) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench", data_size_limit=SIZE_LIMIT,
                     enable_SMTPUTF8=False, decode_data=False, loop=loop),
        "127.0.0.1", port)
    print(f"SMTP listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    return server


async def run_server(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    sink = SinkHandler(expect=args.expect, keep=bool(args.keep))
    handler: object = BareHandler() if args.mode == "bare-smtp" else sink
    server = await serve_smtp(handler, args.port, stop)
    await stop.wait()
    server.close()
    if args.keep:
        await asyncio.to_thread(Path(args.keep).write_bytes, pickle.dumps(sink.messages))


async def replay(args: argparse.Namespace) -> None:
    """Send saved (recipient, bytes) pairs over `connections` reused aiosmtplib clients."""
    messages: list[tuple[str, bytes]] = pickle.loads(
        await asyncio.to_thread(Path(args.messages).read_bytes))
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in messages:
        queue.put_nowait(item)

    async def worker() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=args.port, timeout=60) as client:
            while not queue.empty():
                rcpt, data = queue.get_nowait()
                errors, _ = await client.sendmail(args.sender, [rcpt], data)
                if errors:
                    raise RuntimeError(f"refused: {errors}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.connections)))
    print(f"sent {len(messages)} in {time.perf_counter() - start:.6f} s", flush=True)


EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'


def http_app(*, signed: bool, auth_token: str, public_url: str) -> Starlette:
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(auth_token)

    async def bare(request: Request) -> Response:
        return Response(EMPTY_TWIML, media_type="text/xml")

    async def checked(request: Request) -> Response:
        form = await request.form()
        url = public_url.rstrip("/") + request.url.path
        if not validator.validate(url, form, request.headers.get("x-twilio-signature", "")):
            return Response(status_code=403)
        return Response(EMPTY_TWIML, media_type="text/xml")

    return Starlette(routes=[Route("/sms/twilio", checked if signed else bare,
                                   methods=["POST"])])


async def run_http(args: argparse.Namespace) -> None:
    """The same uvicorn configuration as the service (no access log, httptools, one loop)."""
    import socket

    import uvicorn

    app = http_app(signed=args.mode == "signed-http", auth_token=args.auth_token,
                   public_url=args.public_url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(2048)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           lifespan="off"))
    print(f"HTTP listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await server.serve(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.bench_servers")
    parser.add_argument("mode", choices=("bare-smtp", "sink", "replay", "bare-http",
                                         "signed-http"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--keep", default="", help="sink: pickle received messages here")
    parser.add_argument("--messages", default="", help="replay: pickled messages to send")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--sender", default="enquiries@clinic.example")
    parser.add_argument("--auth-token", default="")
    parser.add_argument("--public-url", default="")
    args = parser.parse_args(argv)
    if args.mode.endswith("-http"):
        asyncio.run(run_http(args))
    else:
        asyncio.run(replay(args) if args.mode == "replay" else run_server(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
