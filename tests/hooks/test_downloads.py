"""Image downloads stream in chunks with a size cap and a checksum, and fail clearly without leaking URLs."""

from __future__ import annotations

import base64
import hashlib
import io
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from PIL import Image

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengDownloadError
from airflow_provider_jimeng.hooks.downloads import ImageDownload
from airflow_provider_jimeng.hooks.jimeng import JiMengHook

PROMPT = "a paper boat on a pond"


def _image_url(hook: JiMengHook, **kwargs: object) -> str:
    [image] = hook.generate_images(PROMPT, size="1K", **kwargs).images  # type: ignore[arg-type]
    assert image.url is not None
    return image.url


def _read_all(download: ImageDownload, chunk_size: int = 65536) -> list[bytes]:
    chunks = []
    while chunk := download.read(chunk_size):
        assert len(chunk) <= chunk_size
        chunks.append(chunk)
    return chunks


def _assert_no_query(message: str, url: str) -> None:
    query = urlsplit(url).query
    assert query
    assert query not in message
    assert "X-Tos-Signature" not in message
    assert "?<redacted>" in message


def test_open_image_streams_the_jpeg_in_chunks_with_size_and_checksum(
    hook: JiMengHook, jimeng_conn: JiMengEmulator
) -> None:
    url = _image_url(hook)
    with hook.open_image(url) as download:
        assert download.content_type == "image/jpeg"
        chunks = _read_all(download, 16384)
        data = b"".join(chunks)
        assert len(chunks) > 1
        assert download.bytes_read == len(data) == download.content_length
        assert download.sha256 == hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size) == ("JPEG", (1024, 1024))
    # The same prompt as base64 is the very same JPEG.
    [inline] = hook.generate_images(PROMPT, size="1K", response_format="b64_json").images
    assert inline.b64_json is not None
    assert base64.b64decode(inline.b64_json) == data
    assert jimeng_conn.downloads == 1


def test_read_without_a_size_reads_everything(hook: JiMengHook) -> None:
    url = _image_url(hook)
    with hook.open_image(url) as download:
        data = download.read()
        assert download.read() == b""
    assert data.startswith(b"\xff\xd8")
    assert download.bytes_read == len(data)


def test_download_above_the_size_cap_is_refused(hook: JiMengHook) -> None:
    url = _image_url(hook)
    with pytest.raises(JiMengDownloadError, match="above the 1000-byte download cap") as caught:
        hook.open_image(url, max_bytes=1000)
    _assert_no_query(str(caught.value), url)


def test_size_cap_holds_without_a_content_length(
    make_hook: Callable[..., JiMengHook], jimeng_conn: JiMengEmulator, canned_server: Callable[..., str]
) -> None:
    url = canned_server(b"\xff\xd8" + bytes(50_000))
    hook = make_hook()
    with hook.open_image(url, max_bytes=20_000) as download:
        assert download.content_length is None
        with pytest.raises(JiMengDownloadError, match="exceeds the 20000-byte download cap") as caught:
            _read_all(download, 8192)
    _assert_no_query(str(caught.value), url)


def test_body_cut_short_raises_a_download_error(
    make_hook: Callable[..., JiMengHook], jimeng_conn: JiMengEmulator, canned_server: Callable[..., str]
) -> None:
    url = canned_server(b"\xff\xd8" + bytes(998), content_length=100_000)
    with make_hook().open_image(url) as download, pytest.raises(JiMengDownloadError, match="broke after") as caught:
        _read_all(download)
    _assert_no_query(str(caught.value), url)


@pytest.mark.parametrize("how", ["expired-at-issue", "short-ttl", "expired-at-download"])
def test_expired_url_raises_a_download_error_saying_so_without_the_query(
    hook: JiMengHook, jimeng_conn: JiMengEmulator, how: str
) -> None:
    if how == "expired-at-issue":
        jimeng_conn.inject(Fault("expired_url"))
    elif how == "short-ttl":
        jimeng_conn.url_ttl = 0.05
    url = _image_url(hook)
    if how == "short-ttl":
        time.sleep(0.1)
    elif how == "expired-at-download":
        jimeng_conn.inject(Fault("expired_url", path="/tos/*"))
    with pytest.raises(JiMengDownloadError) as caught:
        hook.open_image(url)
    message = str(caught.value)
    assert "HTTP 403" in message
    assert "expired" in message
    _assert_no_query(message, url)
    assert jimeng_conn.downloads == 0


def test_missing_image_404_is_not_retried(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    jimeng_conn.inject(Fault("missing_url"))
    url = _image_url(hook)
    with pytest.raises(JiMengDownloadError, match="HTTP 404, the image is gone") as caught:
        hook.open_image(url)
    _assert_no_query(str(caught.value), url)


def test_transient_download_failure_is_retried(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    url = _image_url(hook)
    jimeng_conn.inject(Fault("unavailable", path="/tos/*", times=2))
    with hook.open_image(url) as download:
        assert _read_all(download)
    assert jimeng_conn.downloads == 1


def test_plain_http_to_a_remote_host_is_refused_before_any_request(
    set_connection: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    set_connection({"host": "https://gw.example.com/v1", "password": "sk-download-test-key"})
    url = "http://images.jimeng-test.invalid/x.jpeg?X-Tos-Signature=deadbeef"
    with pytest.raises(JiMengDownloadError) as caught:
        make_hook().open_image(url)
    message = str(caught.value)
    # Had the host been contacted, name resolution of the .invalid domain would have failed instead.
    assert "refusing to download http://images.jimeng-test.invalid/x.jpeg" in message
    assert "only https URLs are fetched" in message
    assert "allow_http=true" in message
    _assert_no_query(message, url)


@pytest.mark.parametrize("scheme", ["ftp", "file"])
def test_non_http_schemes_are_refused(
    set_connection: Callable[..., None], make_hook: Callable[..., JiMengHook], scheme: str
) -> None:
    set_connection({"host": "https://gw.example.com/v1", "password": "sk-download-test-key"})
    with pytest.raises(JiMengDownloadError, match="only https URLs are fetched"):
        make_hook().open_image(f"{scheme}://host/etc/passwd")


def test_plain_http_on_loopback_is_allowed_without_allow_http(
    jimeng_conn: JiMengEmulator, set_connection: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    url = _image_url(make_hook())
    set_connection({"host": "https://gw.example.com/v1", "password": "sk-download-test-key"}, conn_id="jimeng_https")
    with make_hook("jimeng_https").open_image(url) as download:
        assert _read_all(download)


def test_non_image_content_type_is_refused(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    with pytest.raises(JiMengDownloadError, match="Content-Type 'application/json', not an image"):
        hook.open_image(f"{jimeng_conn.root_url}/healthz")
