"""``S3Store``: the artifact store on any S3-compatible endpoint (AWS, MinIO, Ceph, moto).

Server errors, throttling and timeouts are retried by botocore's "standard"
mode with exponential backoff; what still fails after the retries becomes
``StorageUnavailable`` naming the endpoint, so the job fails with
``storage_unavailable`` and can be retried once the endpoint is back. A missing
key is a ``KeyError``, as the ``BlobStore`` interface says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError, ResponseStreamingError

from quantfarm.errors import JobError, StorageUnavailable
from quantfarm.settings import Settings
from quantfarm.store import BlobStore

log = logging.getLogger(__name__)

_MISSING = {"NoSuchKey", "404", "NotFound"}
_DELETE_BATCH = 1000  # the DeleteObjects limit


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


class _RetryLog:
    """Log every failed S3 attempt botocore is about to retry (a needs-retry handler; it decides nothing)."""

    def __init__(self, endpoint: str | None, max_attempts: int):
        self.endpoint, self.max_attempts = endpoint or "AWS S3", max_attempts

    def __call__(self, attempts: int, operation=None, caught_exception=None, response=None, **_):
        status = None
        if response is not None:
            status = int(response[0].status_code)
        if caught_exception is None and (status is None or status < 500) and status not in (429, 408):
            return None
        what = type(caught_exception).__name__ if caught_exception is not None else f"HTTP {status}"
        name = getattr(operation, "name", "request")
        if attempts < self.max_attempts:
            log.warning("S3 %s at %s failed (%s), attempt %d of %d; retrying", name, self.endpoint, what, attempts, self.max_attempts)
        else:
            log.warning("S3 %s at %s failed (%s), attempt %d of %d; giving up", name, self.endpoint, what, attempts, self.max_attempts)
        return None


class S3Store(BlobStore):
    """A bucket (and optional key prefix) on an S3-compatible endpoint."""

    def __init__(
        self,
        client,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        transfer: TransferConfig | None = None,
        create_bucket: bool = False,
        region: str = "us-east-1",
        attempts: int = 1,
        page_size: int = 1000,
        presign_client=None,
    ):
        self.client = client
        self.presign_client = presign_client or client  # signs download URLs for clients' endpoint
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint or f"AWS S3 ({region})"
        self.transfer = transfer or TransferConfig()
        self.region = region
        self.attempts = attempts
        self.page_size = page_size
        self._ensure_bucket = create_bucket

    @classmethod
    def from_settings(
        cls, settings: Settings, *, bucket: str | None = None, prefix: str | None = None, create_bucket: bool | None = None,
        anonymous: bool = False,
    ) -> "S3Store":
        """Build a store from the ``s3_*`` settings; ``bucket``/``prefix`` override theirs.

        The farm's own bucket is created before the first request of any kind if
        missing (and at start-up by ``prepare``); a bucket named explicitly (a
        model source) never is. ``anonymous`` sends unsigned requests: no key of
        the farm's (nor of the environment's) is used.
        """
        from botocore import UNSIGNED

        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        config = Config(
            region_name=settings.s3_region,
            signature_version=UNSIGNED if anonymous else "s3v4",  # presigned URLs would otherwise use the retired SigV2
            connect_timeout=settings.s3_connect_timeout,
            read_timeout=settings.s3_read_timeout,
            # total_max_attempts counts the first try too, so the setting means what its name says.
            retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
            s3={"addressing_style": "path" if settings.s3_path_style else "virtual"},
            # Third-party endpoints often reject the newer default CRC trailers; send them only when required.
            request_checksum_calculation="when_required" if settings.s3_endpoint_url else "when_supported",
            response_checksum_validation="when_required" if settings.s3_endpoint_url else "when_supported",
        )
        def make_client(endpoint_url):
            return boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, aws_access_key_id=settings.s3_access_key_id,
                aws_secret_access_key=secret, config=config,
            )

        client = make_client(settings.s3_endpoint_url)
        client.meta.events.register("needs-retry.s3", _RetryLog(settings.s3_endpoint_url, settings.s3_max_attempts))
        public = settings.s3_public_endpoint_url
        presign_client = make_client(public) if public and public != settings.s3_endpoint_url else None
        transfer = TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold,
            multipart_chunksize=settings.s3_multipart_chunksize,
            max_concurrency=4,
        )
        return cls(
            client,
            bucket or settings.s3_bucket,
            settings.s3_prefix if prefix is None else prefix,
            endpoint=settings.s3_endpoint_url,
            transfer=transfer,
            create_bucket=(bucket is None) if create_bucket is None else create_bucket,
            region=settings.s3_region,
            attempts=settings.s3_max_attempts,
            presign_client=presign_client,
        )

    # --- keys and errors -----------------------------------------------------------------

    def _k(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unprefix(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _unavailable(self, what: str) -> StorageUnavailable:
        return StorageUnavailable(
            f"Object storage at {self.endpoint} is unavailable ({what}) after {self.attempts} attempts; "
            "retry the job once the endpoint is back.",
            details={"endpoint": self.endpoint, "bucket": self.bucket},
        )

    @contextlib.contextmanager
    def _errors(self, op: str, key: str | None = None) -> Iterator[None]:
        """Translate botocore failures into KeyError / StorageUnavailable / JobError."""
        self._ready()
        try:
            yield
        except ClientError as err:
            raise self._from_client_error(err, op, key) from err
        except S3UploadFailedError as err:
            cause = err.__cause__ or err.__context__
            if isinstance(cause, ClientError):
                raise self._from_client_error(cause, op, key) from err
            raise self._unavailable(f"{op} failed: {type(cause or err).__name__}") from err
        except (BotoConnectionError, HTTPClientError, ResponseStreamingError) as err:
            raise self._unavailable(f"{type(err).__name__} during {op}") from err
        except BotoCoreError as err:
            raise JobError(f"Object storage request {op} failed: {err}", code="storage_error") from err

    def _from_client_error(self, err: ClientError, op: str, key: str | None) -> Exception:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = _status(err)
        if key is not None and (code in _MISSING or status == 404) and code != "NoSuchBucket":
            return KeyError(key)
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"):
            return self._unavailable(f"HTTP {status} {code} on {op}")
        if code == "NoSuchBucket":
            return JobError(f"Bucket {self.bucket!r} does not exist at {self.endpoint}.", code="storage_error",
                            details={"bucket": self.bucket})
        if status in (401, 403):
            return JobError(f"Access to bucket {self.bucket!r} at {self.endpoint} was denied ({code}); check the credentials.",
                            code="storage_error", details={"bucket": self.bucket})
        return JobError(f"Object storage refused {op} on bucket {self.bucket!r}: {code or status}.", code="storage_error")

    def prepare(self) -> None:
        """Create the farm's bucket now if this store may (a start-up check)."""
        if self._ensure_bucket:
            self._ready()

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        with self._errors("head_bucket/create_bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as err:
                if _status(err) != 404:
                    raise
            kwargs = {}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self.client.create_bucket(Bucket=self.bucket, **kwargs)
                log.info("created bucket %s at %s", self.bucket, self.endpoint)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _ready(self) -> None:
        # A job's first store call is often a read: make the bucket before any request, once.
        if self._ensure_bucket:
            self._ensure_bucket = False  # ensure_bucket's own requests pass through _errors
            try:
                self.ensure_bucket()
            except BaseException:
                self._ensure_bucket = True
                raise

    # --- BlobStore ----------------------------------------------------------------------------

    def put_file(self, key: str, path: Path) -> None:
        """Upload a file; files above the multipart threshold go up in parts."""
        with self._errors("upload", key):
            self.client.upload_file(str(path), self.bucket, self._k(key), Config=self.transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors("put_object", key):
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        with self._errors("get_object", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()

    def get_file(self, key: str, dest: Path) -> None:
        """Download to ``dest`` atomically (a partial download never appears there)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        os.close(fd)
        try:
            with self._errors("download", key):
                self.client.download_file(self.bucket, self._k(key), tmp, Config=self.transfer)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def open(self, key: str) -> BinaryIO:
        """Return a streaming, file-like body; read it in chunks and close it."""
        with self._errors("get_object", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]

    def _head(self, key: str) -> dict | None:
        with self._errors("head_object", key):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            except ClientError as err:
                if _status(err) == 404:
                    return None
                raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise KeyError(key)
        return int(head["ContentLength"])

    def list_objects(self, prefix: str) -> list[dict]:
        """Return ``{"key", "size", "etag"}`` for every key under ``prefix``, sorted, across pages.

        Like ``LocalStore``, ``a/b`` means keys under ``a/b/`` (never ``a/bc``),
        or the key ``a/b`` itself when it is an object.
        """
        p = prefix.strip("/")
        full = self._k(p) if p else self.prefix
        out = []
        with self._errors("list_objects_v2"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{full}/" if full else "", PaginationConfig={"PageSize": self.page_size}
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append({"key": self._unprefix(obj["Key"]), "size": int(obj["Size"]), "etag": obj.get("ETag", "").strip('"')})
        if not out and p:
            head = self._head(p)
            if head is not None:
                out.append({"key": p, "size": int(head["ContentLength"]), "etag": head.get("ETag", "").strip('"')})
        return sorted(out, key=lambda o: o["key"])

    def list(self, prefix: str) -> list[str]:
        return [o["key"] for o in self.list_objects(prefix)]

    def delete(self, key: str) -> None:
        with self._errors("delete_object"):
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under ``prefix`` in batches of 1,000."""
        keys = self.list(prefix)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": self._k(k)} for k in keys[i:i + _DELETE_BATCH]]
            with self._errors("delete_objects"):
                res = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if res.get("Errors"):
                first = res["Errors"][0]
                raise JobError(f"Could not delete {len(res['Errors'])} objects (first: {first.get('Key')}: {first.get('Code')}).",
                               code="storage_error")

    def uri(self, key: str) -> str:
        key = key.strip("/")
        full = self._k(key) if key else self.prefix
        return f"s3://{self.bucket}/{full}" if full else f"s3://{self.bucket}"

    def presigned_url(self, key: str, expires: int = 3600) -> str | None:
        """Return a time-limited GET URL for ``key`` (no request is made)."""
        with self._errors("presign", key):
            return self.presign_client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._k(key)}, ExpiresIn=int(expires)
            )
