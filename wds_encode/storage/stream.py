"""Reading an S3 object front to back over connections that break: a dropped body continues with
a ranged GET from the byte it reached, pinned to the object's ETag."""

from __future__ import annotations

import io
import random
import socket
import time
from typing import BinaryIO, Optional

from . import S3Options, Storage, StorageError, _client_error_code, s3_error, split_s3

READ_ATTEMPTS = 6             # tries to continue one broken stream, without progress in between
READ_BACKOFF_SECONDS = 0.2    # doubled per failed try, with jitter
READ_BUFFER = 1 << 20
READ_CHUNK = 256 << 10        # bytes asked of the socket at a time: what a break can lose and re-read


def _stream_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the connection broke mid-body": the read continues with a ranged GET."""
    import http.client

    import botocore.exceptions as bex
    import urllib3.exceptions as uex
    return (bex.ResponseStreamingError, bex.ReadTimeoutError, bex.IncompleteReadError, bex.ConnectionClosedError,
            bex.EndpointConnectionError, bex.ConnectionError, uex.HTTPError, http.client.HTTPException,
            ConnectionError, socket.timeout, TimeoutError)


class S3ReadStream(io.RawIOBase):
    """An S3 object as a raw stream that survives dropped connections.

    When the body breaks mid-read (reset, timeout, truncated), it is re-requested from the byte
    reached, with `Range` and `IfMatch=<ETag>` (a changed object is an error, not a silent splice),
    with backoff, up to READ_ATTEMPTS times without progress in between.
    """

    def __init__(self, storage: Storage, url: str, options: Optional[S3Options]):
        super().__init__()
        self.storage = storage
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.client = storage.s3_client(url, options)
        self.pos = 0
        self.size: Optional[int] = None
        self.etag: Optional[str] = None
        self._body = None
        self._failures = 0
        self._broken = _stream_errors()

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        import botocore.exceptions as bex
        args = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            args["Range"] = f"bytes={self.pos}-"
        if self.etag:
            args["IfMatch"] = self.etag
        try:
            response = self.client.get_object(**args)
        except bex.ClientError as exc:
            code, _ = _client_error_code(exc)
            if code in ("InvalidRange", "416") and self.size is not None and self.pos >= self.size:
                self._body = io.BytesIO(b"")
                return
            if code in ("PreconditionFailed", "412"):
                raise StorageError(self.url, f"the object changed while it was being read (ETag {self.etag}); "
                                             "rerun to read the new version") from None
            raise s3_error(self.url, exc, "cannot read") from None
        except self._broken:
            raise   # the connection broke: readinto tries again
        except Exception as exc:   # no credentials, a bad parameter...: no retry helps
            raise s3_error(self.url, exc, "cannot read") from None
        if self.etag is None:
            self.etag = response.get("ETag")
            self.size = int(response.get("ContentLength", 0))
        body = response["Body"]
        if self.pos and not response.get("ContentRange"):  # the server ignored Range: skip what we have
            remaining = self.pos
            while remaining:
                chunk = body.read(min(remaining, READ_BUFFER))
                if not chunk:
                    raise StorageError(self.url, f"object ended at byte {self.pos - remaining} while resuming")
                remaining -= len(chunk)
        self._body = body

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self._body is None:
                    self._open()
                data = self._body.read(min(len(buffer), READ_CHUNK))
                if not data and self.size is not None and self.pos < self.size:
                    raise ConnectionError(f"stream ended at byte {self.pos} of {self.size}")
            except StorageError:
                raise
            except self._broken as exc:
                self._drop_body()
                self._failures += 1
                if self._failures >= READ_ATTEMPTS:
                    raise StorageError(self.url, f"the connection broke {self._failures} times at byte {self.pos} "
                                                 f"without progress; last: {type(exc).__name__}: {exc}") from None
                with self.storage._lock:
                    self.storage.resumes += 1
                time.sleep(READ_BACKOFF_SECONDS * (2 ** (self._failures - 1)) * (0.5 + random.random()))
                continue
            n = len(data)
            buffer[:n] = data
            self.pos += n
            if n:
                self._failures = 0
            return n

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_s3(storage: Storage, url: str, options: Optional[S3Options]) -> BinaryIO:
    """A buffered binary stream of an S3 object (read once, front to back)."""
    return io.BufferedReader(S3ReadStream(storage, url, options), buffer_size=READ_BUFFER)
