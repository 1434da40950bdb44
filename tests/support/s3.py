"""The S3 server of the tests (moto): its bucket, keys, and creating a bucket."""

from __future__ import annotations

S3_BUCKET = "rollcast-test"
S3_KEYS = "rollcast:rollcast-secret"  # access key and secret; moto accepts any


def create_bucket(server: str, bucket: str) -> None:
    """Create ``bucket`` on the moto S3 server at ``server`` (``host:port``)."""
    import pyarrow.fs as pafs

    access, secret = S3_KEYS.split(":")
    pafs.S3FileSystem(access_key=access, secret_key=secret, region="us-east-1", scheme="http",
                      endpoint_override=server, allow_bucket_creation=True).create_dir(bucket)
