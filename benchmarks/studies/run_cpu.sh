#!/usr/bin/env bash
# The committed CPU studies, one after another in one database, so that the verdict compares a search and a
# depth-width study measured on the same machine with the same proxy and latency settings:
#   ablation (weight norm, meta tokens), depth-width, a search, the verdict of that search against the study.
# Each study's JSON (the API's StudyDetail) goes to $OUT; benchmarks/studies/report.py renders them.
#   OUT=/tmp/studies bash benchmarks/studies/run_cpu.sh [ablation] [depth-width] [search] [verdict]
set -euo pipefail
OUT=${OUT:?set OUT to a folder for the JSON}
export HYBRIDNAS_DATA_DIR=${HYBRIDNAS_DATA_DIR:-$OUT/data}
HERE=$(dirname "$0")
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(ablation depth-width search verdict)
for step in "${steps[@]}"; do
  echo "== $step ($(date -u +%H:%M:%S))" >&2
  case $step in
    ablation) hybridnas study ablation "$HERE/ablation_cpu.yaml" --json > "$OUT/ablation.json" ;;
    depth-width) hybridnas study depth-width "$HERE/depth_width_cpu.yaml" --json > "$OUT/depth_width.json" ;;
    search) hybridnas search run "$HERE/search_cpu.yaml" --json > "$OUT/search.json" ;;
    verdict)
      search_id=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$OUT/search.json")
      grid_id=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$OUT/depth_width.json")
      printf 'name: hybrid search against the depth-width Llamas (CPU)\nsearch_id: %s\ndepth_width_id: %s\nseeds: [1, 2]\nexecutor: ray\nworkers: 2\n' \
        "$search_id" "$grid_id" > "$OUT/verdict.yaml"
      hybridnas study verdict "$OUT/verdict.yaml" --json > "$OUT/verdict.json" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
echo "== done ($(date -u +%H:%M:%S))" >&2
