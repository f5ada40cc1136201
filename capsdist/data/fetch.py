"""Reading a dataset's files where they are, with network failures kept apart from corrupt data.

Local paths and `pipe:` commands open through webdataset's gopen. http(s):// URLs open through urllib with a read
timeout, because gopen's curl command has only a connect timeout: a server that stops sending would hang the run
for ever. A failure of the network or the server (refused, timed out, connection cut short, an HTTP error) is a
`NetworkError`; `retried` reads again, a bounded number of times, and then stops with a DataError that says
network, not corruption (preparing the dataset again cannot help). HTTP 404 is FileNotFoundError, as for a file.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.request
from typing import BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from webdataset import gopen

from capsdist.core.errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = 3  # reads of one file before a network failure stops the run
BACKOFF_S = 1.0  # wait before the second read; doubled before each later one
_FAILURES = (OSError, http.client.HTTPException)  # URLError, timeouts and connection resets are OSErrors


class NetworkError(Exception):
    """Reading a URL failed in the network or at the server; the message says how."""


def open_url(url: str, timeout: float) -> BinaryIO:
    """A binary stream of `url`: http(s) through urllib, where `timeout` seconds without data is a NetworkError
    (as is any other failure of the network or the server); anything else through gopen."""
    if urlparse(url).scheme not in ("http", "https"):
        return gopen(url)
    try:
        return _HttpStream(urllib.request.urlopen(url, timeout=timeout), timeout)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise FileNotFoundError(url) from None
        raise NetworkError(f"the server answered HTTP {err.code} {err.reason}") from None
    except _FAILURES as err:
        raise NetworkError(_reason(err, timeout)) from None


def read_url(url: str, timeout: float) -> bytes:
    """The whole content of `url` (open_url), read again after a network failure (`retried`)."""

    def whole() -> Iterator[bytes]:
        with open_url(url, timeout) as f:
            data = f.read()
        yield data  # after the close, which reports a pipe: command's failure

    (data,) = retried(whole, url, timeout)
    return data


def retried(read: Callable[[], Iterator[T]], url: str, timeout: float) -> Iterator[T]:
    """The items of `read()`, which reads `url`; after a NetworkError `read()` is called again (it must skip what
    was already yielded), ATTEMPTS calls in all, then DataError."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            yield from read()
            return
        except NetworkError as err:
            if attempt == ATTEMPTS:
                raise DataError(
                    f"{url}: {err} ({ATTEMPTS} attempts): a network or server problem, not corrupt data; check "
                    f"that the server is up and reachable (a stall counts after data.read_timeout_s={timeout:g} s), "
                    "then run again (a training run continues with --resume auto)"
                ) from None
            delay = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s: %s; reading it again in %g s (attempt %d of %d)", url, err, delay, attempt + 1, ATTEMPTS)
            time.sleep(delay)


class _HttpStream:
    """An HTTP response as a read-only stream whose failures are NetworkErrors, an early end included."""

    def __init__(self, response: http.client.HTTPResponse, timeout: float):
        self.response, self.timeout = response, timeout

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.response.read(size if size >= 0 else None)
        except _FAILURES as err:
            raise NetworkError(_reason(err, self.timeout)) from None
        if not data and size != 0 and self.response.length:  # http.client returns b"" when cut short
            raise NetworkError(f"the server closed the connection {self.response.length} bytes before the end")
        return data

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> _HttpStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(err: BaseException, timeout: float) -> str:
    """What went wrong, in words: a timeout as `no data for N s`."""
    cause = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(cause, TimeoutError):
        return f"no data for {timeout:g} s"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (is the server up?)"
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
