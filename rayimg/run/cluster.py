"""Connecting a job to Ray: the cluster at RAY_ADDRESS, or a local one started in-process."""

from __future__ import annotations

import logging
import os

from rayimg.config import ClusterConfig

# Environment of every worker of a rayimg job: no progress bars from inside workers (Ray Data's
# operator bars, the hub's download bars, diffusers' loading bars) and no library chatter that says
# nothing to the user; the job prints its own progress lines. A variable the user set wins.
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}


def worker_env() -> dict[str, str]:
    """The part of :data:`QUIET_ENV` the user has not set themselves."""
    return {k: v for k, v in QUIET_ENV.items() if k not in os.environ}


def quiet_driver() -> None:
    """The driver's share of :data:`QUIET_ENV`: Ray Data's progress output and its per-dataset
    INFO lines off (datasets created afterwards take this context to their executors and
    split coordinators), hub/transformers/diffusers chatter off."""
    for k, v in worker_env().items():
        os.environ[k] = v
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled ..."
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
    except ImportError:
        pass


def connect(cfg: ClusterConfig) -> str:
    """Initialise Ray once; returns 'existing', 'remote' or 'local'. Workers get :func:`worker_env`
    through the job's runtime environment (merged with what ``ray job submit`` passed)."""
    import ray

    env = worker_env()
    quiet_driver()
    if ray.is_initialized():
        return "existing"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env} if env else None
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        return "remote"
    # The dashboard serves the State API, which Ray Train's placement-group cleaner polls every
    # second (without it, it warns every second); workers find this cluster's API server by
    # RAY_API_SERVER_ADDRESS even beside other Ray clusters on the machine. It also shows the
    # jobs' progress metrics (rayimg_render_*).
    port = _free_port()
    env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    # A Ray without the dashboard's frontend (built from source, some wheels and images) would wait
    # a minute for a dashboard that cannot start: skip it there. include_dashboard=None elsewhere:
    # Ray starts it where it can and carries on where it cannot (e.g. its packages are missing).
    # address="local": a new cluster, as documented. Without it Ray joins the cluster named in
    # /tmp/ray/ray_current_cluster (the last `ray start` on this machine, running or long dead) and
    # then refuses num_cpus/num_gpus.
    ctx = ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                   include_dashboard=None if _dashboard_frontend() else False, dashboard_host="127.0.0.1",
                   dashboard_port=port, configure_logging=False, runtime_env={"env_vars": env})
    if getattr(ctx, "dashboard_url", None):
        print(f"[ray] local cluster, dashboard http://{ctx.dashboard_url}", flush=True)
    else:
        print("[ray] local cluster; its dashboard did not start (this Ray has no dashboard frontend or packages): "
              "progress is in these logs only", flush=True)
    return "local"


def _dashboard_frontend() -> bool:
    """Whether this Ray has the dashboard's web frontend, which its dashboard process needs."""
    import ray.dashboard

    return os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(ray.dashboard.__file__)), "client", "build"))


def _free_port() -> int:
    """A free port below the kernel's ephemeral range: Ray's own processes bind ephemeral ports
    (port 0) while it starts, and one of them could take an ephemeral port picked here before the
    dashboard binds it."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(50):
        port = rng.randrange(max(low - 12000, 10000), max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free below the range: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
