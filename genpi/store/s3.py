"""An artifact store in an S3 bucket (AWS or any S3-compatible server), via boto3."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from genpi.errors import ArtifactNotFound, StoreError
from genpi.store.base import ArtifactStore, check_key, check_prefix, join_key

# Short timeouts and a single retry: a wrong endpoint fails in seconds, not minutes.
_CLIENT_CONFIG = dict(
    connect_timeout=3,
    read_timeout=6,
    retries={"total_max_attempts": 2, "mode": "standard"},
    # only checksum when the API demands it: several S3-compatible servers reject the rest
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)
# A request that fails for a passing reason (connection dropped or refused, timeout, 5xx, throttling)
# is sent again, 0.5 s, 1 s, 2 s, ... (at most 8 s) apart, until the store's retry window has passed;
# anything else (credentials, a missing bucket, a clock off by minutes: RequestTimeTooSkewed) fails at once.
RETRY_S = 60.0
_MAX_BACKOFF_S = 8.0
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "ConditionalRequestConflict",
}
T = TypeVar("T")
log = logging.getLogger("genpi")
# Their DEBUG lines are the wire (Authorization headers, access key ids, response bodies that carry
# secrets under AssumeRole): never logged, whatever level the root logger is at.
for _name in ("botocore", "boto3", "s3transfer", "urllib3"):
    if logging.getLogger(_name).level < logging.INFO:
        logging.getLogger(_name).setLevel(logging.INFO)
_TRANSFER = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20)
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_CREDENTIAL_CODES = {
    "403", "Forbidden", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId",
}  # fmt: skip
_REGION_CODES = {"301", "PermanentRedirect", "AuthorizationHeaderMalformed"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_EXISTS_CODES = {"412", "PreconditionFailed"}  # a create-only write (If-None-Match: *) found the key


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into bucket and prefix (no trailing '/')."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "s3":
        raise StoreError(f"{url!r} is not an S3 store URL: use s3://bucket/prefix")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"store URL {url!r} names no bucket: use s3://bucket/prefix")
    if not _BUCKET_RE.fullmatch(bucket):
        raise StoreError(
            f"store URL {url!r}: {bucket!r} is not a valid bucket name; bucket names use "
            "letters, digits, '.', '-' and '_'"
        )
    return bucket, check_prefix(prefix.rstrip("/"), url)


class S3Store(ArtifactStore):
    """Artifacts as objects below ``s3://bucket/prefix``.

    Credentials, region and endpoint come from the usual AWS settings (environment,
    profiles) unless ``endpoint_url``/``region`` are given. Access to the bucket is
    checked once here, so a wrong endpoint, bucket or key fails at once.
    """

    def __init__(
        self, url: str, endpoint_url: str | None = None, region: str | None = None, retry_s: float = RETRY_S
    ) -> None:
        super().__init__()
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._endpoint_arg = endpoint_url or None
        self._region_arg = region or None
        self.retry_s = retry_s
        self._client = self._make_client()
        self.endpoint_url = self._client.meta.endpoint_url
        self.region = self._client.meta.region_name
        # not retried: at the start a request that fails is most likely a wrong endpoint, told at once
        self._call(None, lambda: self._client.head_bucket(Bucket=self.bucket), retry_s=0)

    def __reduce__(self) -> tuple[Any, ...]:
        # boto3 clients do not pickle; a copy (e.g. in a Ray worker) reopens the bucket
        return (S3Store, (self.url, self._endpoint_arg, self._region_arg, self.retry_s))

    def _make_client(self) -> Any:
        explicit_endpoint = (
            self._endpoint_arg or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        try:
            session = boto3.session.Session()
            if session.get_credentials() is None:
                raise StoreError(
                    f"no AWS credentials found for store {self.url}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
                )
            # S3-compatible servers on custom endpoints (SeaweedFS, MinIO, ...) need
            # path-style URLs; AWS itself resolves either way.
            s3_options = {"addressing_style": "path"} if explicit_endpoint else None
            return session.client(
                "s3",
                endpoint_url=self._endpoint_arg,
                region_name=self._region_arg or session.region_name or "us-east-1",
                config=Config(s3=s3_options, **_CLIENT_CONFIG),
            )
        except BotoCoreError as e:
            raise StoreError(
                f"cannot set up S3 access for store {self.url}: {e}; check AWS_PROFILE, "
                "AWS_ENDPOINT_URL and ~/.aws/config"
            ) from e
        except ValueError as e:  # a malformed endpoint URL
            raise StoreError(
                f"bad S3 endpoint {explicit_endpoint!r} for store {self.url} ({e}): check "
                "--store.endpoint-url or AWS_ENDPOINT_URL"
            ) from e

    def _key(self, key: str) -> str:
        return join_key(self.prefix, check_key(key, self.url))

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{join_key(self.prefix, key)}"

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Turn boto3 failures into StoreErrors naming the store and the fix."""
        try:
            yield
        except S3UploadFailedError as e:
            if isinstance(e.__context__, ClientError):
                raise self._client_error(e.__context__, key) from e
            raise StoreError(f"upload to {self.location(key or '')} failed: {e}") from e
        except ClientError as e:
            raise self._client_error(e, key) from e
        except NoCredentialsError as e:
            raise StoreError(
                f"no AWS credentials found for store {self.url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from e
        except (BotoConnectionError, HTTPClientError) as e:
            raise StoreError(
                f"cannot reach the S3 endpoint {self.endpoint_url} for store {self.url} ({e}): "
                "check --store.endpoint-url or AWS_ENDPOINT_URL, and that the server is up"
            ) from e
        except ParamValidationError as e:
            raise StoreError(f"bad S3 request for store {self.url}: {e}") from e
        except BotoCoreError as e:
            raise StoreError(f"S3 request to {self.endpoint_url} failed for store {self.url}: {e}") from e

    def _client_error(self, e: ClientError, key: str | None) -> StoreError:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (key is None and code in _MISSING_CODES):
            return StoreError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint_url} (store "
                f"{self.url}): create it or fix the store URL"
            )
        if key is not None and code in _MISSING_CODES:
            return ArtifactNotFound(f"artifact {key!r} not found at {self.location(key)}")
        if code == "RequestTimeTooSkewed":
            return StoreError(
                f"{self.endpoint_url} refused a request for store {self.url}: this machine's clock "
                "differs from the server's by minutes; set the clock right (NTP) and rerun"
            )
        if code in _CREDENTIAL_CODES or status == 403:
            return StoreError(
                f"credentials rejected by {self.endpoint_url} for store {self.url} ({code}): "
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to a key that "
                f"may read and write bucket {self.bucket!r}"
            )
        if code in _REGION_CODES:
            return StoreError(
                f"bucket {self.bucket!r} is in another region than the one used for store "
                f"{self.url} ({code}): set --store.region or AWS_DEFAULT_REGION"
            )
        message = error.get("Message") or e
        return StoreError(f"S3 request to {self.endpoint_url} failed for store {self.url}: {code} {message}")

    def _call(self, key: str | None, action: Callable[[], T], retry_s: float | None = None) -> T:
        """Run one request, again on a passing failure until ``retry_s`` (default: the store's) seconds have passed."""
        retry_s = self.retry_s if retry_s is None else retry_s
        deadline = time.monotonic() + retry_s
        for attempt in itertools.count():
            try:
                with self._errors(key):
                    return action()
            except StoreError as e:
                pause = min(_MAX_BACKOFF_S, 0.5 * 2**attempt) * random.uniform(0.8, 1.2)
                if not _transient(e.__cause__):
                    raise
                if time.monotonic() + pause > deadline:
                    if retry_s:
                        raise StoreError(
                            f"{e} (still failing after {retry_s:g} s of retries; a longer outage "
                            "needs a larger --store.retry-s)"
                        ) from e.__cause__
                    raise
                log.warning("S3 request for %s failed (%s); trying again", self.location(key or ""), e)
                time.sleep(pause)
        raise AssertionError("unreachable")

    def put_bytes(self, key: str, data: bytes) -> None:
        s3_key = self._key(key)
        self._call(key, lambda: self._client.put_object(Bucket=self.bucket, Key=s3_key, Body=data))

    def create_bytes(self, key: str, data: bytes) -> bool:
        s3_key = self._key(key)
        try:
            self._call(key, lambda: self._client.put_object(Bucket=self.bucket, Key=s3_key, Body=data, IfNoneMatch="*"))
        except StoreError as e:
            if isinstance(e.__cause__, ClientError) and _code(e.__cause__) in _EXISTS_CODES:
                return False
            raise
        return True

    def get_bytes(self, key: str) -> bytes:
        s3_key = self._key(key)
        return self._call(key, lambda: self._client.get_object(Bucket=self.bucket, Key=s3_key)["Body"].read())

    def put_file(self, key: str, path: str | Path) -> None:
        s3_key = self._key(key)
        if not os.path.isfile(path):
            raise StoreError(f"cannot store {path} in {self.url}: it is not a readable file")
        self._call(key, lambda: self._client.upload_file(str(path), self.bucket, s3_key, Config=_TRANSFER))

    def get_file(self, key: str, path: str | Path) -> Path:
        s3_key = self._key(key)
        dest = Path(path)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # s3transfer writes to a temp name and renames, so dest is never half-written
            self._call(key, lambda: self._client.download_file(self.bucket, s3_key, str(dest), Config=_TRANSFER))
        except OSError as e:
            raise self._local_write_failed(dest, key, e) from e
        return dest

    def exists(self, key: str) -> bool:
        s3_key = self._key(key)
        try:
            self._call(key, lambda: self._client.head_object(Bucket=self.bucket, Key=s3_key))
        except ArtifactNotFound:
            return False
        return True

    def list_keys(self, prefix: str = "") -> list[str]:
        return sorted(self.etags(prefix))

    def etags(self, prefix: str) -> dict[str, str]:
        """``{key: "<size> <ETag>"}`` below folder ``prefix``: what each object is, from one listing."""
        full = join_key(self.prefix, check_prefix(prefix, self.url))
        cut = len(self.prefix) + 1 if self.prefix else 0

        def listing() -> dict[str, str]:  # retried as a whole: pages are not resumed
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{full}/" if full else ""
            )
            return {
                obj["Key"][cut:]: f"{obj['Size']} {obj.get('ETag', '')}"
                for page in pages
                for obj in page.get("Contents", ())
                if not obj["Key"].endswith("/")
            }  # no folder placeholders

        return self._call(None, listing)

    def delete_key(self, key: str) -> None:
        s3_key = self._key(key)
        self._call(key, lambda: self._client.delete_object(Bucket=self.bucket, Key=s3_key))

    def delete_prefix(self, prefix: str) -> None:
        prefix = check_prefix(prefix, self.url, allow_root=False)
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": join_key(self.prefix, k)} for k in keys[start : start + 1000]]
            response = self._call(
                None,
                lambda batch=batch: self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StoreError(
                    f"could not delete {len(response['Errors'])} objects under "
                    f"{self.location(prefix)} ({first.get('Code')}: {first.get('Message')}): "
                    "check that the credentials may delete in this bucket"
                )


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _transient(error: BaseException | None) -> bool:
    """Whether a boto3 failure may pass if the request is sent again."""
    if isinstance(error, S3UploadFailedError):
        error = error.__context__
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or str(error.response.get("Error", {}).get("Code", "")) in _TRANSIENT_CODES
    return False
