# Sourced by scripts/gpu/round.sh: sweep_wait DIR SECONDS waits (at most SECONDS) while the ML-1M sweep
# whose pid is in DIR/sweep.pid (written by scripts/gpu/ml1m_sweep.sh, removed when it ends) is alive.
# Returns at once when no sweep runs. Tested in tests/test_gpu_suite_rest.py.
sweep_wait() {
  local pidf="$1/sweep.pid" i
  for i in $(seq 1 "$2"); do
    [ -f "$pidf" ] && kill -0 "$(cat "$pidf" 2>/dev/null)" 2>/dev/null || return 0
    sleep 1
  done
  return 1  # still running after SECONDS
}
