"""A two-node Ray cluster on one machine running `rayimg render` jobs; run by tests/test_render_scale.py
in its own process (the test session already holds a Ray cluster of its own).

    python tests/render_cluster_run.py '<json>'   # {"runs": [[name, job_dict, remove_after_images], ...]}

Each node has 1 CPU and declares one GPU (Ray schedules it like a real one; the actors render on
the CPU), and each render actor asks for a GPU as on a GPU cluster, so the two actors land one per
node and the job takes the same Ray Data path as on GPUs. A run with ``remove_after_images`` > 0
removes the worker node once that many PNGs exist, and the job ends on the node left (no node
replaces it: Ray's ``Cluster.add_node`` works from the main thread only, and the main thread is
running the job). Prints ``RESULT <json>`` with each run's summary.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rayimg.config import RenderJob, from_dict
    from rayimg.run.render import run

    spec = json.loads(sys.argv[1])
    node = {"num_cpus": 1, "num_gpus": 1}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    worker = cluster.add_node(**node)
    cluster.wait_for_nodes()
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
                    cluster.remove_node(worker, allow_graceful=False)
                    print(f"[test] removed a node after {info['images_before_removal']} image(s)", flush=True)

                watcher = threading.Thread(target=remove, daemon=True)
                watcher.start()
            t = time.time()
            summary = run(job)
            info.update(summary=summary, seconds=round(time.time() - t, 1))
            results[name] = info
    finally:
        print("RESULT " + json.dumps(results), flush=True)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
