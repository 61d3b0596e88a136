#!/bin/bash
# One trial of configs/omniglot.py (issue 13): the trained run, then the same config with
# zero training steps (the untrained network), appending a row to $OUT/table.md.
#   experiments/omniglot_default/trial.sh NAME [--config.X=Y ...]
# Run from anywhere; workdirs go to $OUT (default /tmp/omniglot_trials). Overrides must not
# set schedule.epochs / warmup.epochs (the untrained run sets them to 0 last).
set -e
name=$1; shift
out=${OUT:-/tmp/omniglot_trials}; mkdir -p "$out"
cd "$(dirname "$0")/../.."
w=$out/$name; rm -rf "$w" "$w.u"
/usr/bin/time -f "%e %U %S" -o "$w.time" python -m gl_jax.main --config=configs/omniglot.py \
  --workdir="$w" --config.logging.progress=False "$@" > "$w.log" 2>&1
python -m gl_jax.main --config=configs/omniglot.py --workdir="$w.u" \
  --config.logging.progress=False "$@" --config.schedule.epochs=0 --config.warmup.epochs=0 \
  > "$w.u.log" 2>&1
python - "$w" "$name" "$*" <<'PY' | tee -a "$out/table.md"
import json, os, sys
w, name, args = sys.argv[1:]
t = json.load(open(w + "/results.json"))["test"]
u = json.load(open(w + ".u/results.json"))["test"]
wall, user, sys_ = map(float, open(w + ".time").read().split()[-3:])
print(f"| {name} | `{args}` | {wall:.0f} | {user + sys_:.0f} | {u['recall@1']:.3f} | "
      f"{t['recall@1']:.3f} | {t.get('nmi', float('nan')):.3f} | {os.getloadavg()[0]:.1f} |")
PY
