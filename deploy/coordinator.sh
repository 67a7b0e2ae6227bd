#!/bin/sh
# The coordinator container: migrate, join the Ray cluster (a Ray driver runs on a cluster node), serve.
set -eu
hybridnas db upgrade
case "${RAY_ADDRESS:-}" in
    "" | ray://*) ;;  # a local Ray, or Ray Client: no node to start here
    *)  # no CPUs (evaluations go to the workers), and none of the coordinator's secrets in Ray's processes
        env -u HYBRIDNAS_TOKEN -u HYBRIDNAS_DATABASE_URL -u DATABASE_URL -u PGPASSWORD \
            ray start --address="$RAY_ADDRESS" --num-cpus=0 --disable-usage-stats ;;
esac
exec hybridnas serve --host 0.0.0.0 --port 8000
