"""Test suite (a package, so tests can share helpers as `tests.builders`, `tests.conftest`)."""
