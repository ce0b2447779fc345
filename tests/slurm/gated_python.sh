#!/bin/sh
# Stand-in for PYTHON in tests/slurm/test_slurm_real.py: holds a rank in its start-up (before
# the interpreter runs, so before any stop handler exists) until the file $GATE exists, then
# runs the real interpreter $GATED_PYTHON with the same arguments. While it waits, it marks
# itself with $GATE.waiting.<host name>.
touch "$GATE.waiting.$(hostname)"
while [ ! -e "$GATE" ]; do sleep 0.1; done
exec "$GATED_PYTHON" "$@"
