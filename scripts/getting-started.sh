#!/usr/bin/env bash
# The "Try it offline" commands of docs/getting-started.md. The page shows the two marked sections of
# this file, and `make package-check` runs the whole file in a fresh virtual environment that holds only
# the built wheel: the page cannot show a command that was not checked. The lines outside the sections
# are the check's scaffolding (the emulator in the background instead of a second terminal, cleanup).
set -euo pipefail
# The check runs in its own folder: the page's throwaway AIRFLOW_HOME lands under it (TMPDIR).
: "${AIRFLOW_HOME:?set AIRFLOW_HOME to a throwaway folder}"
export TMPDIR="$AIRFLOW_HOME"
mkdir -p "$TMPDIR"
cd "$TMPDIR"
# --8<-- [start:home]
export AIRFLOW_HOME="${TMPDIR:-/tmp}/jimeng-try-airflow"   # a throwaway Airflow home for this try
mkdir -p "$AIRFLOW_HOME"
# --8<-- [end:home]
set -m # the emulator runs in its own process group, ended by that id when the script exits

run_emulator() {
# --8<-- [start:emulator]
python -m airflow_provider_jimeng.emulator --port 8765
# --8<-- [end:emulator]
}
rm -f emulator.out && mkfifo emulator.out
run_emulator >emulator.out 2>emulator.log &
emulator_group=$!
trap 'kill -- -"$emulator_group" 2>/dev/null || true' EXIT
# The emulator prints its banner, ending "Press Ctrl-C to stop.", once it listens: wait for that line.
sed -u '/Press Ctrl-C to stop/q' <emulator.out | tee emulator.banner
grep -q "Press Ctrl-C to stop" emulator.banner || {
    cat emulator.log >&2
    echo "the emulator did not start" >&2
    exit 1
}

# --8<-- [start:run]
export AIRFLOW_CONN_JIMENG_DEFAULT='{"conn_type": "jimeng", "host": "http://127.0.0.1:8765/api/v3",
  "password": "emulator-key", "extra": {"allow_http": true}}'
python -m airflow_provider_jimeng.examples     # writes the example DAGs into Airflow's DAGs folder
airflow db migrate                             # a new AIRFLOW_HOME needs its database first
airflow pools set jimeng 4 "JiMeng API calls"  # the mapped example runs in this pool (see Scaling out)
AIRFLOW__CORE__TEST_CONNECTION=Enabled airflow connections test jimeng_default
airflow dags test jimeng_hello
# --8<-- [end:run]
