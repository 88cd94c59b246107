"""Run the emulator from a shell: ``python -m airflow_provider_jimeng.emulator --port 8765``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from airflow_provider_jimeng.emulator.images import require_pillow
from airflow_provider_jimeng.emulator.server import DEFAULT_API_KEY, JiMengEmulator
from airflow_provider_jimeng.emulator.visual import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_jimeng.emulator",
        description="Serve an offline emulator of the JiMeng / Seedream image generation API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind, 0 for any (default: %(default)s)")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--api-key", default=DEFAULT_API_KEY, help="bearer key to accept (default: %(default)s)")
    auth.add_argument("--no-auth", action="store_true", help="accept any key or none")
    parser.add_argument(
        "--access-key-id", default=DEFAULT_ACCESS_KEY_ID, help="Visual API access key id (default: %(default)s)"
    )
    parser.add_argument(
        "--secret-access-key",
        default=DEFAULT_SECRET_ACCESS_KEY,
        help="Visual API secret access key (default: %(default)s)",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per generated image (default: 0)")
    parser.add_argument("--images-per-minute", type=int, default=None, help="rate limit (default: unlimited)")
    parser.add_argument(
        "--rate-limit-burst",
        type=int,
        default=None,
        help="make the rate limit a token bucket of this many images, refilled evenly (default: a sliding 60 s window)",
    )
    parser.add_argument("--url-ttl", type=float, default=86400.0, help="signed URL lifetime in seconds")
    parser.add_argument("--moderation-marker", default="FORBIDDEN", help="prompts containing it are refused")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        require_pillow()
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    emulator = JiMengEmulator(
        host=args.host,
        port=args.port,
        api_key=None if args.no_auth else args.api_key,
        access_key_id=None if args.no_auth else args.access_key_id,
        secret_access_key=args.secret_access_key,
        latency=args.latency,
        images_per_minute=args.images_per_minute,
        rate_limit_burst=args.rate_limit_burst,
        url_ttl=args.url_ttl,
        moderation_marker=args.moderation_marker,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with emulator:
        print(f"JiMeng emulator listening on {emulator.root_url}")
        print(f"  official base URL: {emulator.base_url}")
        print(f"  OpenAI-style base URL: {emulator.openai_base_url}")
        print(f"  API key: {emulator.api_key if emulator.api_key is not None else '(any)'}")
        if emulator.access_key_id is not None:
            print(f"  Visual API (POST {emulator.root_url}/?Action=...): access key {emulator.access_key_id}")
        print(
            f"  ledger and counters (no key): {emulator.root_url}/_emulator/ledger, {emulator.root_url}/_emulator/stats"
        )
        print("Press Ctrl-C to stop.", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
