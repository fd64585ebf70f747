# Sourced by export.sh and benchmark.sh: sets CLI to the ugt-serving command line to run.
# UGT_SERVING overrides it (e.g. ".venv/bin/ugt-serving"); else the installed script; else the module.
if [[ -n "${UGT_SERVING:-}" ]]; then
  read -r -a CLI <<< "$UGT_SERVING"
elif command -v ugt-serving >/dev/null 2>&1; then
  CLI=(ugt-serving)
else
  CLI=("${PYTHON:-python3}" -m algorithm.serving.cli)
fi
