"""Entry point for ``ray job submit --working-dir . -- python ray_jobs/serve_cascade.py --config FILE --detach``.

Connects to the cluster the job runs on and deploys the cascade exactly as ``corea serve`` does; with
``--detach`` the job ends once the applications are running and they stay up on the cluster."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's corea first

from corea.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
