"""A two-node Ray cluster on one machine running `rayimg render` jobs; run by tests/test_render_scale.py
in its own process (the test session already holds a Ray cluster of its own).

    python tests/render_cluster_run.py '<json>'   # {"runs": [[name, job_dict, remove_after_images], ...]}

Each node has 1 CPU and declares one GPU (Ray schedules it like a real one; the actors render on
the CPU), and each render actor asks for a GPU as on a GPU cluster, so the two actors land one per
node and the job takes the same Ray Data path as on GPUs. A run with ``remove_after_images`` > 0
removes the worker node once that many PNGs exist (the job ends on the node left) and adds a
fresh node in its place after the job (as an autoscaler replaces a lost machine). Prints ``RESULT <json>`` with each run's summary.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def add_node(cluster, node: dict, timeout: float = 600):
    """``cluster.add_node`` with a long wait for the node to join: this script runs beside a busy
    test session at the lowest CPU priority, where Ray's own 30 s wait can run out."""
    import ray

    added = cluster.add_node(wait=False, **node)
    ray._private.services.wait_for_node(added.gcs_address, added.plasma_store_socket_name, timeout)
    return added


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rayimg.config import RenderJob, from_dict
    from rayimg.run.render import run

    spec = json.loads(sys.argv[1])
    node = {"num_cpus": 1, "num_gpus": 1}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    state = {"worker": add_node(cluster, node)}
    results = {}
    try:
        for name, data, remove_after in spec["runs"]:
            job = from_dict(RenderJob, {**data, "cluster": {"address": cluster.address}})
            info: dict = {}
            watcher = None
            if remove_after:
                def remove(out=Path(job.output.uri) / "images", info=info):
                    while not (out.is_dir() and len(list(out.glob("*.png"))) >= remove_after):
                        time.sleep(0.05)
                    info["images_before_removal"] = len(list(out.glob("*.png")))
                    cluster.remove_node(state["worker"], allow_graceful=False)
                    state["worker"] = None
                    print(f"[test] removed a node after {info['images_before_removal']} image(s)", flush=True)

                watcher = threading.Thread(target=remove, daemon=True)
                watcher.start()
            t = time.time()
            summary = run(job)
            info.update(summary=summary, seconds=round(time.time() - t, 1))
            results[name] = info
            if state["worker"] is None:  # a fresh node in the lost one's place, for the next run (Ray adds
                state["worker"] = add_node(cluster, node)  # nodes from the main thread only: it sets signal handlers)
                print("[test] added a replacement node", flush=True)
    finally:
        print("RESULT " + json.dumps(results), flush=True)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
