#!/usr/bin/env bash
# Peer benchmark: TRL 0.11.4 PPOTrainer.step on the same shapes as benchmarks/ppo_step.py.
#
# Creates the peer's own venv OUTSIDE the repository (it pins transformers 4.46, which must not
# meet the project's transformers 5), then runs ../shared/peers/trl011_ppo_step.py in it.
#
#   benchmarks/peer_trl.sh setup            # create/refresh the venv only (idempotent)
#   benchmarks/peer_trl.sh run [ARGS...]    # setup, then run the peer script (extra args passed on)
#
# Env: PEER_VENV (default /work/peer-venv), PEER_PYTHON (default python3.11),
#      MODEL_DIR (default ~/.cache/rlhf-chat/SmolLM2-135M-Instruct).
# benchmarks/ppo_step.py --peer-python "$PEER_VENV/bin/python" runs the same peer script itself,
# in the same run as our measurement.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEER_VENV="${PEER_VENV:-/work/peer-venv}"
PEER_PYTHON="${PEER_PYTHON:-python3.11}"
MODEL_DIR="${MODEL_DIR:-$HOME/.cache/rlhf-chat/SmolLM2-135M-Instruct}"
PEER_SCRIPT="${PEER_SCRIPT:-$here/../../shared/peers/trl011_ppo_step.py}"

setup() {
  if [ ! -x "$PEER_VENV/bin/python" ]; then
    "$PEER_PYTHON" -m venv "$PEER_VENV"
  fi
  if ! "$PEER_VENV/bin/python" -c "import trl, transformers, torch, rich; assert trl.__version__=='0.11.4' and torch.__version__.startswith('2.13.0')" 2>/dev/null; then
    "$PEER_VENV/bin/pip" install --quiet torch==2.13.0
    # trl 0.11.4 imports rich without declaring it; constrain torch so nothing replaces it.
    echo "torch==2.13.0" > "$PEER_VENV/constraints.txt"
    "$PEER_VENV/bin/pip" install --quiet -c "$PEER_VENV/constraints.txt" \
      trl==0.11.4 transformers==4.46.3 rich
  fi
  "$PEER_VENV/bin/python" -c "import trl, transformers, torch; print('peer venv ok:', trl.__version__, transformers.__version__, torch.__version__)"
}

cmd="${1:-run}"; shift || true
case "$cmd" in
  setup) setup ;;
  run)
    setup
    HF_HUB_OFFLINE=1 "$PEER_VENV/bin/python" "$PEER_SCRIPT" --model "$MODEL_DIR" \
      --batch 8 --new-tokens 48 --steps 4 --seed 0 --floor "$@"
    ;;
  *) echo "usage: $0 setup|run [args]" >&2; exit 2 ;;
esac
