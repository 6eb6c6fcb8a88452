"""Print the fastest variant of a unet_step_bench.json at one batch (by graph_s), minus ':eager'."""
import json
import sys

rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["batch"] == int(sys.argv[2]) and r.get("graph_s")]
best = min(rows, key=lambda r: r["graph_s"])
print(":".join(f for f in best["variant"].split(":") if f != "eager"))
