"""An offline emulator of the JiMeng / Seedream image generation API, for tests, demos and benchmarks.

Importing this package does not need Pillow; generating images does
(``pip install 'airflow-provider-jimeng[emulator]'``)::

    from airflow_provider_jimeng.emulator import JiMengEmulator, Fault

    with JiMengEmulator(latency=0.1) as emulator:
        emulator.inject(Fault("rate_limit", retry_after=1))
        ...  # point a connection at emulator.base_url with key emulator.api_key
        assert emulator.billed_images == 1
"""

from __future__ import annotations

from airflow_provider_jimeng.emulator.faults import FAULT_KINDS, Fault
from airflow_provider_jimeng.emulator.ledger import LedgerEntry
from airflow_provider_jimeng.emulator.protocol import FAIL_IMAGE_MARKER, KNOWN_MODELS
from airflow_provider_jimeng.emulator.server import DEFAULT_API_KEY, JiMengEmulator
from airflow_provider_jimeng.emulator.visual import (
    DEFAULT_ACCESS_KEY_ID,
    DEFAULT_SECRET_ACCESS_KEY,
    POLL_FAULT_PATH,
    SUBMIT_FAULT_PATH,
)

__all__ = [
    "DEFAULT_ACCESS_KEY_ID",
    "DEFAULT_API_KEY",
    "DEFAULT_SECRET_ACCESS_KEY",
    "FAIL_IMAGE_MARKER",
    "FAULT_KINDS",
    "KNOWN_MODELS",
    "POLL_FAULT_PATH",
    "SUBMIT_FAULT_PATH",
    "Fault",
    "JiMengEmulator",
    "LedgerEntry",
]
