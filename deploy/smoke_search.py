"""A tiny search through a coordinator's REST API (deploy/compose_smoke.sh step 5): submit, poll until it
ends, print the Pareto front and, per candidate, the Ray node and pid that evaluated it. Exit 1 unless the
search completed with every evaluation on a worker container."""

from __future__ import annotations

import os
import sys
import time

import httpx

SEARCH = {
    "name": "compose-smoke",
    "space": {"preset": "benchmark"},
    "strategy": "pareto-aging",
    "strategy_options": {"population_size": 4, "sample_size": 2},
    "budget": 4,
    "executor": "ray",
    "workers": 2,
    "cpus_per_worker": 1,
    "proxy": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_tokens": 64},
    "latency": {"prompt_len": 4, "decode_tokens": 2, "repeats": 1, "warmup": 0, "throughput": False},
}


def wait_ready(client: httpx.Client, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/api/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    raise SystemExit("coordinator not ready")


def main(base: str) -> int:
    headers = {"Authorization": f"Bearer {os.environ['HYBRIDNAS_TOKEN']}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        wait_ready(client)
        job = client.post("/api/searches", json=SEARCH)
        job.raise_for_status()
        job_id = job.json()["id"]
        print(f"POST /api/searches -> search {job_id}")
        while (detail := client.get(f"/api/searches/{job_id}").json())["status"] in ("queued", "running"):
            time.sleep(3)
        print(f"search {job_id}: {detail['status']}")
        front = client.get(f"/api/searches/{job_id}/pareto").json()["items"]
        for item in front:
            print(
                f"front: candidate {item['id']} val_bpb {item['val_bpb']:.3f} "
                f"decode {item['decode_ms']:.3f} ms"
            )
        hosts = set()
        for summary in client.get(f"/api/searches/{job_id}/candidates").json()["items"]:
            cand = client.get(f"/api/candidates/{summary['id']}").json()
            worker = (
                (cand.get("latency") or {}).get("worker") or (cand.get("training") or {}).get("worker") or {}
            )
            hosts.add(worker.get("host"))
            print(
                f"candidate {cand['id']} {cand['status']}: host {worker.get('host')} pid {worker.get('pid')} "
                f"ray node {worker.get('node_id')}"
            )
    return 0 if detail["status"] == "completed" and None not in hosts else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
