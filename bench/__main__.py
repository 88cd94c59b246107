"""Run the benchmarks: ``python -m bench`` (``make bench``), ``python -m bench --quick`` for a smoke run.

One section alone, reduced: ``python -m bench --only p1 --quick`` (add ``--repeats 3`` for medians).
One section measured again into the last results and report: ``python -m bench --only p5 --merge``.

Writes ``bench/results/latest.json``, ``docs/benchmarks.md`` and ``docs/img/bench-scaling.png``
(a ``--quick`` run writes only ``bench/results/quick.tmp`` unless told otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTION_NAMES = (
    "p1_throughput",
    "p2_rate_limit",
    "p3_memory",
    "p4_overhead",
    "scaling",
    "p5_shared_limit",
    "p8_gallery",
    "p9_visual",
)
#: ``--only p1`` for ``--only p1_throughput``, and so on.
SHORT_NAMES = {name.split("_")[0]: name for name in SECTION_NAMES}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one worker: checks the harness runs")
    parser.add_argument(
        "--only",
        action="append",
        type=lambda name: SHORT_NAMES.get(name, name),
        choices=SECTION_NAMES,
        help="run only this section (repeatable; p1, p2, p3, p4, p5, p8, p9 for short)",
    )
    parser.add_argument("--json", type=Path, help="where to write the results (default: bench/results/latest.json)")
    parser.add_argument("--docs", type=Path, help="where to write the Markdown report (default: docs/benchmarks.md)")
    parser.add_argument(
        "--plot",
        type=Path,
        help="where to write the scaling plot (default: docs/img/bench-scaling.png)",
    )
    parser.add_argument("--no-docs", action="store_true", help="write only the JSON")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add the sections run to the existing JSON (and report) instead of replacing it",
    )
    parser.add_argument("--repeats", type=int, help="runs of each repeated timing (default: 3, quick: 1)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of every operator run into this directory")
    parser.add_argument(
        "--jpeg-bits-per-pixel",
        type=float,
        default=2.0,
        help="pad emulated JPEGs to this weight, like real photos (0: the emulator's flat ~0.1 bit/px)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Airflow reads its configuration on import: give this process (and the workers) a private home.
    home = tempfile.mkdtemp(prefix="jimeng-bench-home-")
    os.environ.update({"AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home}/airflow.db"

    from bench import report
    from bench.scenarios import FULL, NOT_IN_QUICK, QUICK, SECTIONS, Harness, new_workdir
    from bench.services import running_stack

    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = sizes.with_repeats(args.repeats)
    default_json = REPO_ROOT / "bench" / "results" / ("quick.tmp" if args.quick else "latest.json")
    json_path = args.json or default_json
    write_docs = not args.no_docs and (not args.quick or args.docs is not None)
    workdir = new_workdir()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    def progress(message: str) -> None:
        print(message, flush=True)

    started = time.monotonic()
    results: dict[str, object] = {"meta": report.machine_info(quick=args.quick, sizes=sizes)}
    results["meta"]["jpeg_bits_per_pixel"] = args.jpeg_bits_per_pixel  # type: ignore[index]
    progress(f"Benchmarks ({'quick' if args.quick else 'full'}); worker logs in {workdir}")
    # A smoke run only checks that the harness works: short retry waits keep it fast.
    extras = {"retry_backoff": 0.2} if args.quick else {}
    with running_stack(jpeg_bits_per_pixel=args.jpeg_bits_per_pixel, connection_extras=extras) as stack:
        harness = Harness(stack, workdir, progress=progress, profile_dir=args.profile, fresh_workers=not args.quick)
        try:
            for name, section in SECTIONS.items():
                if args.only and name not in args.only:
                    continue
                if args.quick and not args.only and name in NOT_IN_QUICK:
                    continue
                results[name] = section(harness, sizes)
        finally:
            harness.close()
    results["meta"]["duration_s"] = time.monotonic() - started  # type: ignore[index]
    results["meta"]["load_average_end"] = os.getloadavg()  # type: ignore[index]

    if args.merge and json_path.exists():
        # Only the sections run are new: each keeps the date and load of the run that measured it.
        merged = json.loads(json_path.read_text())
        for name in SECTION_NAMES:
            if name in results:
                merged[name] = results[name]
                merged["meta"].setdefault("sections", {})[name] = {
                    key: results["meta"][key]  # type: ignore[index]
                    for key in ("date", "load_average_start", "load_average_end", "duration_s")
                }
        results = merged
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(results, json_path)
    print()
    print(report.text_table(results))
    print(f"\nResults: {json_path}")
    if write_docs and "scaling" in results:
        plot_path = args.plot or REPO_ROOT / "docs" / "img" / "bench-scaling.png"
        docs_path = args.docs or REPO_ROOT / "docs" / "benchmarks.md"
        plotted = report.plot_scaling(results["scaling"], plot_path)  # type: ignore[arg-type]
        report.write_markdown(results, docs_path, plot_path if plotted else None)
        print(f"Report: {docs_path}" + (f", plot: {plot_path}" if plotted else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
