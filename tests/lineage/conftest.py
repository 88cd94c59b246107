"""The lineage tests run the operator as the operator tests do: the emulator and moto's S3 on loopback."""

from __future__ import annotations

from tests.operators.conftest import bucket, emulator  # noqa: F401  # fixtures, shared
