"""Entry point for `ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/<file>.yaml [overrides]`
(README, "On a cluster")."""

import sys

from _entry import run  # jobs/ is sys.path[0] when this file runs as a script

if __name__ == "__main__":
    sys.exit(run("serve"))
