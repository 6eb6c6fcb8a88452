"""Entry point for `ray job submit --working-dir . -- python jobs/prepare.py --config jobs/configs/<file>.yaml [overrides]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds the rayimg package

from rayimg.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
