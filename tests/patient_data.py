"""The test patients' personal data, in one place, for the log scan (tests/logscan.py).

Any log record at INFO or above that contains one of `SENTINELS`, an email address outside
`OUR_DOMAINS` or a phone number other than `OUR_NUMBERS` fails the test run. Add the
distinctive words of a new test patient's subject or message here.
"""

from __future__ import annotations

from tests import builders

OUR_DOMAINS = ("clinic.example",)
"""Our own side (mailboxes, team addresses): configuration, not patient data."""
OUR_NUMBERS = ("+442079460000",)
"""The clinic's published phone number (digits only, with the + of E.164)."""

SENTINELS = (
    # addresses and numbers (also caught by the generic patterns; listed for clarity)
    builders.PATIENT_ADDRESS, "jane.patient@example.org", "jane@example.com",
    "+447700900123", "07700 900123", "07700900123",
    # names
    "Jane Patient", "John Patient",
    # subjects and message text the tests send
    builders.SUBJECT, "invasive ductal carcinoma", "pathology report and scans",
    "Second opinion on my treatment plan", "HER2+ breast cancer", "offered a mastectomy",
    "chest pain and I can't breathe", "histology results", "out of the office until",
    "prostate MRI",
    # SMS tests (tests/test_sms_*.py)
    "Can your team review my plan", "I can send my scan report tomorrow", "I am on tamoxifen",
    "My biopsy report",
)
