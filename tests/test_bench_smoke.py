"""The benchmarks' own code paths with a handful of messages, so `scripts/bench` cannot rot.

No timing is asserted: only that every benchmark ran, checked its own correctness (what got
a 250 / 200 is stored, every due email reached the sink) and produced its figures. Python
load generators stand in for smtp-source and wrk, so neither postfix nor wrk is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

from handler.bench import BENCHES, plan_smoke, render, run
from handler.bench_data import _copy_sql, _suffixed
from handler.bench_harness import Figure, ratios
from handler.models import Base


async def test_every_benchmark_runs_and_checks_itself(tmp_path: Path) -> None:
    report = await run(plan_smoke(), list(BENCHES), tmp_path)

    assert not [n for n in report.notes if "FAILED" in n], report.notes
    titles = " ".join(row.benchmark for row in report.rows)
    for part in ("SMTP intake", "Ack latency", "Webhook", "Delivery", "Rules", "Memory"):
        assert part in titles
    rates = [r for r in report.rows
             if r.subject.startswith("handler serve") and r.unit in ("msg/s", "req/s")]
    assert len(rates) == 3  # intake, webhook, delivery: each beside its baseline
    assert all(r.ratio is not None and r.verdict for r in rates)
    assert all(r.figure.median > 0 for r in report.rows)
    assert "| SMTP intake" in render(report, ["cpu: test"], 1.0)
    # the webhook's stages alone: every timed request got its text and its team email
    (alone,) = [r for r in report.rows if r.unit == "µs CPU/request"]
    sent = re.search(r"([\d,]+) texts and ([\d,]+) emails sent for ([\d,]+) requests", alone.note)
    assert sent and sent[1] == sent[2] == sent[3] != "0", alone.note
    assert alone.target.startswith("≤") and alone.verdict in ("yes", "NO")


def test_figures_are_medians_with_min_max_and_ratios_per_round() -> None:
    figure = Figure((3.0, 1.0, 2.0))
    assert (figure.median, figure.low, figure.high) == (2.0, 1.0, 3.0)
    assert figure.show() == "2 (1–3)"
    assert ratios([10.0, 30.0], [20.0, 30.0]).values == (0.5, 1.0)


def test_copied_rows_keep_unique_keys_unique() -> None:
    table = Base.metadata.tables["message"]
    assert "external_id" in _suffixed(table)
    sql = _copy_sql(table, offset=1000, top=1000)
    assert '"id" + 1000' in sql and '"enquiry_id" + 1000' in sql
    assert "\"external_id\" || '.1000'" in sql
