"""`scripts/bench rules`: how fast `classify` decides with 10, 100 and 1,000 generated rules.

The rules mix word lists (most of them), channel, domain, header and regex conditions; the
message is a realistic 2 KB email that only the last rule matches, so every rule is considered
and traced. Prints messages/second and the median microseconds per decision.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from datetime import UTC, datetime

from handler.classify import classify
from handler.decision import Facts
from handler.rule_cases import make_message
from handler.rules import RuleSet, parse_ruleset

SIZES = (10, 100, 1000)
TEAMS = ("breast", "urology", "lung", "colorectal", "haematology", "gynaecology", "skin",
         "coordinator", "on-call", "communications", "finance")

BODY = """\
Dear Sir or Madam,

I am writing on behalf of my father, who is 71 and lives in Croydon. In March his GP sent him
for blood tests because he was getting up several times a night, and his PSA came back at 14.
He then had an MRI scan at our local hospital, which showed a PI-RADS 4 lesion, and a biopsy in
May confirmed prostate cancer with a Gleason score of 4+3. The CT and bone scans did not show
any spread, which was a relief to all of us.

His urologist has recommended a radical prostatectomy, but the oncologist he saw afterwards
suggested that radiotherapy with hormone treatment would give the same chance of cure with
fewer side effects. My father is fit for his age, still plays golf twice a week and looks after
my mother, so he is worried about incontinence and about being out of action for weeks after
an operation. We have read a lot online and are now more confused than before.

We would like a second opinion from one of your specialists on which treatment is right for
him, and whether active surveillance could be an option at all with his results. I can send
the MRI report, the biopsy histology and the letters from both consultants. He has private
medical insurance through his old employer, but we are happy to pay ourselves if needed.

Could you also tell me how long the wait is for an appointment, whether he needs a referral
letter from his GP, and if I can come with him to the consultation? He is a little hard of
hearing, so it would help to have someone with him. We could travel to London on any weekday
except Tuesdays, when he has his hospital transport booked for my mother's dialysis.

He takes tablets for blood pressure and had a knee replacement in 2019, but is otherwise well.
He is not keen on a long stay in hospital, and his main question is what each option would
mean for his everyday life over the next ten years, not only for the cancer itself.

Thank you very much for your help. We have heard good things about your clinic from a friend
whose husband was seen by your team last year, and we would be grateful for any advice.

With kind regards,
Sarah
"""

_WORDS = [w.strip(".,?()'").lower() for w in BODY.split() if len(w) > 3]


def _phrase(rng: random.Random) -> str:
    return " ".join(f"term{rng.randrange(50_000)}" for _ in range(rng.choice((1, 1, 2, 3))))


def generate_rules_yaml(n: int, seed: int = 7) -> str:
    """`n` rules in the shipped style; only the last one matches the benchmark message."""
    rng = random.Random(seed)
    lines = ["teams:"]
    lines += [f"  - {{id: {t}, email: {t}-team@clinic.example}}" for t in TEAMS]
    lines.append("rules:")
    for i in range(n - 1):
        words = ", ".join(_phrase(rng) for _ in range(rng.randint(4, 10)))
        kind = i % 20
        if kind < 14:  # a plain word list: the common case
            when = f"{{text: {{any: [{words}]}}}}"
        elif kind < 16:  # words the message has, but for SMS only
            when = f"{{text: {{any: [{rng.choice(_WORDS)}, {words}]}}, channel: sms}}"
        elif kind < 18:
            when = f"{{channel: sms, body: {{any: [{words}]}}}}"
        elif kind == 18:
            when = (f"{{any: [{{from_domain: [d{i}.example]}}, {{subject: {{all: [{words}]}}}}, "
                    f"{{header: {{x-mailer: campaign-{i}}}}}]}}")
        else:
            when = f"{{earlier_enquiries: {{min: 3}}, regex: {{body: 'ref[- ]?{i}\\b'}}}}"
        lines.append(f"  - name: rule-{i}")
        lines.append(f"    when: {when}")
        lines.append(f"    team: {TEAMS[i % len(TEAMS)]}")
        lines.append(f"    category: cat-{i % 12}")
    lines.append("  - name: last-rule")
    lines.append("    when: {text: {any: [second opinion]}}")
    lines.append("    team: urology")
    return "\n".join(lines) + "\n"


def measure(ruleset: RuleSet, *, seconds: float = 1.5) -> tuple[float, float, int]:
    """(messages per second, median microseconds, decisions made)."""
    msg = make_message(subject="Second opinion for my father", body=BODY)
    facts, now = Facts(), datetime(2026, 11, 25, 11, 0, tzinfo=UTC)
    for _ in range(20):
        classify(msg, ruleset, facts, now)
    timings: list[int] = []
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    while True:
        t0 = clock()
        decision = classify(msg, ruleset, facts, now)
        t1 = clock()
        timings.append(t1 - t0)
        if t1 >= deadline:
            break
    assert decision.rule == "last-rule", decision.rule  # the benchmark itself is valid
    total = (clock() - start) / 1e9
    return len(timings) / total, statistics.median(timings) / 1000, len(timings)


def main(argv: list[str] | None = None) -> int:
    seconds = float((argv or sys.argv[1:] or ["1.5"])[0])
    print(f"classify: one {len(BODY.encode())}-byte email that only the last rule matches, so "
          f"every rule is considered; {seconds:.1f} s per size")
    print("rules: 70% word lists, 20% for SMS only, 5% any-of sender domain / subject words / "
          "header, 5% earlier enquiries + regex")
    print(f"{'rules':>6} {'load ms':>8} {'msgs/s':>9} {'median µs':>10} {'decisions':>10}")
    medians: dict[int, float] = {}
    for n in SIZES:
        text = generate_rules_yaml(n)
        t0 = time.perf_counter()
        ruleset = parse_ruleset([(f"generated-{n}.yaml", text)])
        load_ms = (time.perf_counter() - t0) * 1000
        rate, median_us, count = measure(ruleset, seconds=seconds)
        medians[n] = median_us
        print(f"{n:>6} {load_ms:>8.1f} {rate:>9,.0f} {median_us:>10.1f} {count:>10,}")
    print(f"ratio 1,000 / 100 rules (median): {medians[1000] / medians[100]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
