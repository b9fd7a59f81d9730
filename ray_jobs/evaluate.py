"""Entry point for ``ray job submit --working-dir . -- python ray_jobs/evaluate.py --config FILE``.

Connects to the cluster the job runs on and evaluates exactly as ``corea eval`` does."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's corea first

from corea.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
