"""The object store (``output_path``) on its own: fsspec's local filesystem and its in-memory one.

``file://`` is the backend the fault suite runs on; ``memory://`` stands in for a cloud store here
(no rename, an object is published when its writer closes), so both write paths are exercised.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from airflow_provider_jimeng.exceptions import (
    JiMengConfigurationError,
    JiMengDownloadInterruptedError,
    JiMengStorageConfigurationError,
    JiMengStorageError,
)
from airflow_provider_jimeng.options import RunOptions
from airflow_provider_jimeng.storage.base import ImageStore
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.objstore import ObjectImageStore
from airflow_provider_jimeng.storage.records import JournaledImage, JournalEntry, answer_from_stored_objects
from airflow_provider_jimeng.storage.s3 import READ_CHUNK_BYTES, LocalJournal

JPEG = b"\xff\xd8" + bytes(range(256)) * 4000  # about 1 MiB


class Download(io.BytesIO):
    """A download stream that remembers how much each read asked for."""

    def __init__(self, data: bytes, *, fail_after: int | None = None) -> None:
        super().__init__(data)
        self.asked: list[int] = []
        self.fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        self.asked.append(-1 if size is None else size)
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise JiMengDownloadInterruptedError("the download broke off (test)")
        return super().read(size)


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectImageStore:
    if request.param == "file":
        fs: Any = LocalFileSystem()
        (tmp_path / "root").mkdir()
        bucket, prefix = "", f"{str(tmp_path).strip('/')}/root"
    else:
        fs = MemoryFileSystem()
        bucket, prefix = f"bucket-{tmp_path.name[-20:].lower().replace('_', '-')}", "images"
    keyspace = TaskKeyspace(bucket, prefix, "dag", "run", "task", -1, scheme=request.param, key_root=prefix)
    return ObjectImageStore(fs, keyspace, local_journal=LocalJournal(keyspace, tmp_path / "journal"))


def test_both_stores_implement_the_engines_interface(store: ObjectImageStore) -> None:
    typed: ImageStore = store  # mypy checks the protocol; this checks the runtime members exist
    for name in ImageStore.__dict__:
        if not name.startswith("_"):
            assert hasattr(typed, name), name


def test_an_image_is_streamed_in_pieces_and_vouches_through_its_sidecar(store: ObjectImageStore) -> None:
    key = store.keyspace.image_key(0, 0)
    download = Download(JPEG)
    metadata = {"jimeng-request-id": "req-1", "jimeng-fingerprint": "fp", "jimeng-delivered": "0", "jimeng-failed": ""}

    size, sha256 = store.upload_stream(key, download, metadata)

    assert size == len(JPEG)
    assert set(download.asked) == {READ_CHUNK_BYTES}, "never the whole image at once"
    assert store.existing_keys(first=True)[key] == len(JPEG)
    assert store.meta_key(key) in store.existing_keys()
    head = store.head(key)
    assert head["ContentLength"] == len(JPEG)
    assert head["Metadata"]["jimeng-request-id"] == "req-1"
    assert head["ContentType"] == "image/jpeg"
    answer = answer_from_stored_objects("fp", {0: head})
    assert answer is not None
    assert answer.request_id == "req-1"
    assert json.loads(store._fs.cat_file(store._path(store.meta_key(key))))["sha256"] == sha256


def test_an_image_cut_short_does_not_vouch(store: ObjectImageStore) -> None:
    key = store.keyspace.image_key(0, 0)
    store.upload_bytes(key, JPEG, {"jimeng-request-id": "req-1"})
    with store._fs.open(store._path(key), "wb") as handle:  # what a crash mid-write could leave
        handle.write(JPEG[:1000])

    assert store.head(key)["Metadata"] == {}


def test_a_broken_download_leaves_nothing_under_the_key(store: ObjectImageStore) -> None:
    key = store.keyspace.image_key(0, 0)

    with pytest.raises(JiMengDownloadInterruptedError):
        store.upload_stream(key, Download(JPEG, fail_after=3 * READ_CHUNK_BYTES), {"jimeng-request-id": "r"})

    assert store.existing_keys() == {}, "no image, no partial file, no sidecar"


def test_records_journals_and_their_discarding(store: ObjectImageStore) -> None:
    keyspace = store.keyspace
    entry = JournalEntry(0, "fp", 1.0, "req-1", "m", 1, {}, (JournaledImage(0, "1K", "https://x/y"),), ())
    store.write_json(keyspace.journal_key("try-00000"), {"prompts": {"0": entry.to_json()}})
    existing = store.existing_keys()
    entries, objects = store.read_journals(existing, 1)
    assert entries[0].request_id == "req-1"
    assert objects == {keyspace.journal_key("try-00000"): {0}}

    store.discard_journals(list(objects), [0])

    assert store.journal_keys(store.existing_keys()) == []
    assert store.read_json(keyspace.records_key) is None


def test_a_publication_outside_the_prefix_keeps_its_sidecar_under_the_task(store: ObjectImageStore) -> None:
    keyspace = store.keyspace
    custom = TaskKeyspace(
        keyspace.bucket, keyspace.prefix, "dag", "run", "task", -1, "flat/{run_id}-{prompt_index}.{ext}",
        scheme=keyspace.scheme, key_root=keyspace.key_root,
    )  # fmt: skip
    other = ObjectImageStore(store._fs, custom, local_journal=store.local_journal)
    canonical, key = custom.image_key(3, 0), custom.publication_key(3, 0)
    assert canonical.startswith(custom.task_prefix + "/"), "the canonical copy stays in the task's keyspace"
    assert key == f"{keyspace.prefix}/flat/run-3.jpeg", "rendered under output_path"
    assert other.head_if_exists(key) is None
    other.upload_bytes(canonical, JPEG, {"jimeng-request-id": "req-3"})

    other.copy_object(canonical, key, {"jimeng-request-id": "req-3"})

    assert other.meta_key(key).startswith(custom.meta_prefix + "ext-")
    assert store._fs.cat_file(other._path(key)) == JPEG
    assert other.head(key)["Metadata"]["jimeng-request-id"] == "req-3"
    assert (other.head_if_exists(key) or {})["Metadata"]["jimeng-request-id"] == "req-3"
    # Another writer replaced the bytes (same length): the sidecar no longer vouches for them.
    store._fs.pipe_file(other._path(key), JPEG[:-1] + b"\x00")
    assert (other.head_if_exists(key) or {})["Metadata"] == {}


def test_a_missing_local_directory_fails_before_anything_is_paid(tmp_path: Path) -> None:
    keyspace = TaskKeyspace("", f"{str(tmp_path).strip('/')}/not-mounted", "d", "r", "t", -1, scheme="file")
    store = ObjectImageStore(LocalFileSystem(), keyspace)

    with pytest.raises(JiMengStorageConfigurationError, match="is not a directory on this worker"):
        store.existing_keys(first=True)


def test_a_refused_write_is_a_storage_error_naming_the_uri(store: ObjectImageStore, monkeypatch: Any) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store._fs, "open", refuse)
    with pytest.raises(JiMengStorageError, match=r"writing .*records\.json failed: PermissionError"):
        store.write_records([])


# ---------------------------------------------------------------------------------------- options
def _parse(**values: Any) -> RunOptions:
    return RunOptions.parse(storage_requested=values.get("s3_bucket") is not None, **{"s3_bucket": None, **values})


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("gs://my-images/jimeng/", "gs://my-images/jimeng"),
        ("abfs://container/a/b", "abfs://container/a/b"),
        ("file:///data/images", "file:///data/images"),
        ("GS://bucket", "gs://bucket/"),
    ],
)
def test_output_path_is_checked_and_normalised(given: str, expected: str) -> None:
    options = _parse(output_path=given)
    assert options.output_path == expected
    assert options.s3_bucket is None
    assert options.stores


def test_an_s3_output_path_takes_the_s3_path() -> None:
    options = _parse(output_path="s3://my-images/team/jimeng", output_conn_id="aws_team")
    assert (options.s3_bucket, options.s3_key_prefix, options.output_path) == ("my-images", "team/jimeng", None)
    assert options.output_conn_id == "aws_team"


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"output_path": "gs://b/p", "s3_bucket": "my-bucket"}, "both given"),
        ({"output_path": "/data/images"}, "has no scheme"),
        ({"output_path": "data/images"}, "has no scheme"),
        ({"output_path": "file://host/data"}, "names a host"),
        ({"output_path": "file:///"}, "root"),
        ({"output_path": "gs:///prefix"}, "names no bucket"),
        ({"output_path": "gs://conn@bucket/p"}, "user or connection"),
        ({"output_path": "gs://bucket/p?x=1"}, "query"),
        ({"output_path": "gs://bucket/a/../b"}, r"'\.\.'"),
        ({"output_path": "   "}, "is empty"),
        ({"output_path": "None"}, "not allowed"),
        ({"output_path": "s3://Not_A_Bucket/p"}, "not a valid bucket name"),
        ({"output_path": "gs://b/p", "s3_key_prefix": "other"}, "applies to s3_bucket only"),
    ],
)
def test_bad_destinations_are_refused_before_any_request(values: dict[str, Any], match: str) -> None:
    with pytest.raises(JiMengConfigurationError, match=match):
        _parse(**values)


def test_a_key_template_cannot_climb_out_of_output_path() -> None:
    keyspace = TaskKeyspace("", "data/images", "d", "r", "t", -1, "../{run_id}/{prompt_index}-{image_index}.{ext}",
                            scheme="file", key_root="data/images")  # fmt: skip
    with pytest.raises(JiMengConfigurationError, match="allowed under output_path"):
        keyspace.check_image_keys([1])
