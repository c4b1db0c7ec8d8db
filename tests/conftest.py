"""Shared pytest fixtures."""

from tests.s3_server import s3_server  # noqa: F401  (session SeaweedFS S3 server)
