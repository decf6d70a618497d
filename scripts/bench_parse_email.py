"""Cost of parsing one inbound mail: stdlib policies against handler.parse_email.

Run: .venv/bin/python scripts/bench_parse_email.py  (prints microseconds per message)
"""

from __future__ import annotations

import sys
import timeit
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from handler.parse_email import parse_email
from tests.builders import (
    BODY,
    FileSpec,
    alternative_email,
    attachment_email,
    html_email,
    plain_email,
)

TEXT = (BODY * 4)[:1500]
HTML = "<html><body>" + "".join(f"<p>{line}</p>" for line in TEXT.splitlines()) + "</body></html>"
SAMPLES = {
    "plain, QP": plain_email(TEXT, transfer_encoding="quoted-printable",
                              subject="Zweitmeinung – ärztlicher Bericht"),
    "alternative": alternative_email(TEXT[:700], HTML[:900]),
    "html-only": html_email(HTML),
    "mixed + 4 KB pdf": attachment_email(
        TEXT, [FileSpec("report.pdf", "application/pdf", bytes(range(256)) * 16)], html=HTML),
}


def default_policy_extract(raw: bytes) -> None:
    """Roughly what parse_email does, written the obvious way with policy.default."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    _ = (msg["subject"], msg["from"].addresses, msg["to"].addresses, msg["message-id"])
    body = msg.get_body(("plain", "html"))
    if body is not None:
        body.get_content()
    for part in msg.iter_attachments():
        part.get_content()


def main() -> None:
    number = 2000
    print(f"{'message':20} {'bytes':>6} {'compat32 parse':>15} {'default+extract':>16} "
          f"{'parse_email':>12}")
    for name, raw in SAMPLES.items():
        compat = timeit.timeit(lambda r=raw: BytesParser(policy=policy.compat32).parsebytes(r),
                               number=number)
        default = timeit.timeit(lambda r=raw: default_policy_extract(r), number=number)
        ours = timeit.timeit(lambda r=raw: parse_email(r), number=number)
        print(f"{name:20} {len(raw):6} {compat / number * 1e6:13.0f}us "
              f"{default / number * 1e6:14.0f}us {ours / number * 1e6:10.0f}us")


if __name__ == "__main__":
    main()
