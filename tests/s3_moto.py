"""An S3 endpoint for tests: moto's server on a free local port, reached over HTTP like the real service.

``moto_s3()`` starts it, points the AWS environment of this process (and of the Ray workers and subprocesses
it starts) at it with dummy credentials, creates a bucket and yields ``s3://<bucket>``."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

BUCKET = "corea-test"


@contextmanager
def moto_s3(bucket: str = BUCKET) -> Iterator[str]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def object_keys(uri: str) -> list[str]:
    """Every key under an ``s3://bucket/prefix`` URI, straight from the S3 API (not through corea.storage)."""
    import boto3

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
