#!/usr/bin/env bash
# `make package-check`: a user's install works the way docs/getting-started.md says.
#
# Builds the sdist and, from it, the wheel; checks that both carry LICENSE and the wheel the example DAGs;
# installs the wheel (not editable) into a fresh virtual environment, pinned by requirements/constraints.txt;
# then runs scripts/getting-started.sh, the page's own commands, there, in a throwaway AIRFLOW_HOME.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
UV=${UV:-uv}
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/jimeng-package-check.XXXXXX")
trap 'status=$?; if [ "$status" -eq 0 ]; then rm -rf "$work"; else echo "package-check failed; its files are in $work" >&2; fi' EXIT

echo "== build (sdist, then the wheel from the sdist)"
"$UV" build --quiet --python "$PYTHON" --out-dir "$work/dist" "$repo"
wheel=$(echo "$work"/dist/*.whl)
sdist=$(echo "$work"/dist/*.tar.gz)
"$PYTHON" - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile

wheel, sdist = sys.argv[1:]
wheel_names = zipfile.ZipFile(wheel).namelist()
sdist_names = tarfile.open(sdist).getnames()
problems = []
if not any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel_names):
    problems.append("the wheel has no LICENSE")
if not any(name.endswith("/LICENSE") and name.count("/") == 1 for name in sdist_names):
    problems.append("the sdist has no LICENSE")
for example in ("jimeng_hello.py", "prompts/hello.j2"):
    if f"airflow_provider_jimeng/examples/dags/{example}" not in wheel_names:
        problems.append(f"the wheel lacks the example {example}")
if problems:
    sys.exit("; ".join(problems))
print(f"{wheel.rsplit('/', 1)[-1]}: {len(wheel_names)} files; {sdist.rsplit('/', 1)[-1]}: {len(sdist_names)} files")
PY

echo "== install the wheel into a fresh virtual environment"
"$UV" venv --quiet --python "$PYTHON" "$work/venv"
"$UV" pip install --quiet --python "$work/venv/bin/python" --constraint "$repo/requirements/constraints.txt" \
    "$wheel[emulator]"
# The provider must come from the wheel, not from the checkout.
(cd "$work" && "$work/venv/bin/python" -c "
import airflow_provider_jimeng as p, sys
sys.exit(0 if '/site-packages/' in p.__file__ else f'imported from {p.__file__}, not from the wheel')")

echo "== docs/getting-started.md, Try it offline (scripts/getting-started.sh)"
(
    export PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv" AIRFLOW_HOME="$work/airflow"
    export AIRFLOW__CORE__LOAD_EXAMPLES=False
    unset PYTHONPATH
    bash "$repo/scripts/getting-started.sh"
)
echo "== package-check passed"
