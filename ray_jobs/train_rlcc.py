"""Entry point for ``ray job submit --working-dir . -- python ray_jobs/train_rlcc.py --config FILE``.

Connects to the cluster the job runs on and trains exactly as ``corea train`` does."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's corea first

from corea.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
