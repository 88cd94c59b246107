"""Where object keys are decided: one task instance's keyspace, proved collision-free before paying.

Keys depend only on the DAG, run, task, map index, prompt index and image index, so a retried or
cleared task finds what an earlier try stored. Every image's canonical copy lives in that keyspace
(:meth:`TaskKeyspace.image_key`), where no other task instance writes. A custom key template
(``s3_key``) names a *publication*, a copy made after the canonical object is stored
(:meth:`TaskKeyspace.publication_key`, :mod:`.publications`). :meth:`TaskKeyspace.check_image_keys`
renders every key a run can write, before the first request, and proves that no two publications
(nor the same image of another run, map index, task or DAG) can land on the same key, and that every
key fits the destination (S3's 1,024 bytes; a local filesystem's 255 bytes per name, no NUL).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from airflow_provider_jimeng.exceptions import JiMengConfigurationError

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")
#: Key fields holding text, and a format spec that can truncate text (a precision, or a nested field).
_TEXT_FIELDS = frozenset({"dag_id", "run_id", "task_id"})
_TRUNCATING_SPEC = re.compile(r"\.\d|\{")
KEY_TEMPLATE_FIELDS = ("dag_id", "run_id", "task_id", "map_index", "prompt_index", "image_index", "ext")
#: S3's limit on a key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
#: A local filesystem's limit on one name, in bytes (ext4, XFS, APFS, NTFS...), and on a whole path.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095
#: What a local write adds to a file's name while it is written: ``.{name}.{12 hex}.part``.
PARTIAL_NAME_OVERHEAD = len("..0123456789ab.part")
#: Schemes whose keys become paths on a local filesystem.
LOCAL_SCHEMES = frozenset({"file", "local"})
#: The longest id :func:`safe_key_part` keeps whole: one path segment, with room to spare under 255 bytes.
MAX_SAFE_PART = 200
DEFAULT_IMAGE_EXT = "jpeg"


def check_bucket_name(bucket: Any) -> str:
    """Return ``bucket`` if S3 would accept it as a bucket name; otherwise refuse, naming the rule it breaks."""
    rules = "3-63 characters of lower-case letters, digits, '.' and '-', starting and ending with a letter or digit"
    if not isinstance(bucket, str) or not _BUCKET_NAME.match(bucket):
        shown = repr(bucket) if not isinstance(bucket, str) else repr(bucket[:80])
        raise JiMengConfigurationError("s3_bucket", f"{shown} is not a valid bucket name; allowed: {rules}")
    if ".." in bucket or _IP_ADDRESS.match(bucket):
        raise JiMengConfigurationError(
            "s3_bucket", f"{bucket!r} is not a valid bucket name (no '..', not an IP address)"
        )
    return bucket


def safe_key_part(value: object) -> str:
    """A run id or task id made safe and readable inside a key, without ever merging two ids.

    Characters outside ``A-Za-z0-9._=-`` become ``_``. Where that changed the id, a short hash of
    the original follows, so ``scheduled__2025-01-01T00:00:00+00:00`` and
    ``scheduled__2025-01-01T00_00_00_00_00`` (already safe, kept as is) stay apart.
    An id longer than :data:`MAX_SAFE_PART` characters (Airflow allows 250) is cut, and the hash
    follows too, so that it fits one name of a local filesystem (255 bytes) whatever the backend.
    """
    text = str(value)
    safe = _UNSAFE_KEY_CHARS.sub("_", text).strip("_") or "_"
    if safe == text and len(safe) <= MAX_SAFE_PART:
        return safe
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{safe[: MAX_SAFE_PART - len(digest) - 1].rstrip('_')}-{digest}"


def template_fields(template: str) -> set[str]:
    """The replacement fields of a key template; refuses positional, attribute and index fields."""
    allowed = ", ".join("{" + name + "}" for name in KEY_TEMPLATE_FIELDS)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise JiMengConfigurationError(
            "s3_key", f"is not a valid format string ({exc}); allowed fields: {allowed}"
        ) from None
    names = set()
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if name not in KEY_TEMPLATE_FIELDS:
            raise JiMengConfigurationError(
                "s3_key", f"uses the field {{{name}}}, which is not allowed; allowed fields: {allowed}"
            )
        if name in _TEXT_FIELDS and spec and _TRUNCATING_SPEC.search(spec):
            # A precision cuts the id: runs whose ids differ only past the cut (r100 and r101 under
            # {run_id:.3}) would share keys, and the other-run probe cannot see ids not yet made.
            raise JiMengConfigurationError(
                "s3_key",
                f"{{{name}:{spec}}} can cut the {name.replace('_', ' ')} short, so another {name.replace('_', ' ')} "
                f"could get the same key; allowed: {{{name}}} unabridged (a width or alignment is fine, a precision "
                "is not)",
            )
        names.add(name)
    return names


@dataclass(frozen=True)
class TaskKeyspace:
    """The keys one task instance writes: images, records and journals under one prefix."""

    bucket: str
    prefix: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    key_template: str | None = None
    image_ext: str = DEFAULT_IMAGE_EXT
    #: The URL scheme of :meth:`uri` (``s3``, or an object store's: ``gs``, ``abfs``, ``file`` ...).
    scheme: str = "s3"
    #: Where a custom ``key_template`` renders under: empty on S3 (keys are the bucket's), the path of
    #: ``output_path`` otherwise, so a template never leaves the destination it was given.
    key_root: str = ""

    @property
    def task_prefix(self) -> str:
        parts = [self.prefix.strip("/")] if self.prefix.strip("/") else []
        parts += [safe_key_part(self.dag_id), safe_key_part(self.run_id), safe_key_part(self.task_id)]
        if self.map_index >= 0:
            parts.append(f"map_{self.map_index}")
        return "/".join(parts)

    def image_key(self, prompt_index: int, image_index: int) -> str:
        """The canonical key of an image: in the task's keyspace, whatever ``s3_key`` says."""
        return f"{self.task_prefix}/p{prompt_index:04d}_i{image_index:02d}.{self.image_ext}"

    def publication_key(self, prompt_index: int, image_index: int) -> str | None:
        """Where ``s3_key`` publishes a copy of the image (``None`` without a template)."""
        if self.key_template:
            key = self.key_template.format(
                dag_id=safe_key_part(self.dag_id),
                run_id=safe_key_part(self.run_id),
                task_id=safe_key_part(self.task_id),
                map_index=self.map_index,
                prompt_index=prompt_index,
                image_index=image_index,
                ext=self.image_ext,
            ).lstrip("/")
            root = self.key_root.strip("/")
            return f"{root}/{key}" if root and key else key
        return None

    @property
    def records_key(self) -> str:
        return f"{self.task_prefix}/records.json"

    @property
    def journal_prefix(self) -> str:
        return f"{self.task_prefix}/_pending/"

    def journal_key(self, batch: str) -> str:
        return f"{self.journal_prefix}{batch}.json"

    def fallback_journal_name(self, name: str) -> str:
        """The name of a journal kept outside the store (a worker's file, a Redis key) when the store
        refused it: a hash of its would-be URI, so it names no DAG, run, bucket or signed URL."""
        uri = self.uri(f"{self.journal_prefix}{name}")
        return hashlib.sha256(uri.encode()).hexdigest()[:40]

    @property
    def meta_prefix(self) -> str:
        """Where an object store keeps each image's metadata (S3 keeps it on the object itself)."""
        return f"{self.task_prefix}/_meta/"

    def uri(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    # --------------------------------------------------------------------------------- the proof
    def check_image_keys(self, images_per_prompt: Sequence[int]) -> None:
        """Refuse, before anything is paid for, a layout in which a billable image could not be kept.

        Renders the canonical key and the publication (``s3_key``) of every (prompt, image) the run
        can bill: each must fit the destination. Publications must all differ, must stay out of the
        task's own keyspace, and the first one, rendered as if for another run, map index, task or
        DAG, must change: otherwise two task instances would publish to one key.
        """
        local = self.scheme in LOCAL_SCHEMES
        if self.key_template is not None:
            template_fields(self.key_template)
        keys: dict[str, tuple[int, int]] = {}
        for prompt_index, images in enumerate(images_per_prompt):
            for image_index in range(images):
                if local:
                    self._check_local_path("output_path", self.image_key(prompt_index, image_index))
                if self.key_template is None:
                    continue
                key = self._render("s3_key", prompt_index, image_index)
                if key in keys:
                    first = keys[key]
                    raise JiMengConfigurationError(
                        "s3_key",
                        f"gives prompt {first[0]} image {first[1]} and prompt {prompt_index} image {image_index} "
                        f"the same key {key!r}; allowed: a template in which {{prompt_index}} and {{image_index}} "
                        "tell every image apart",
                    )
                keys[key] = (prompt_index, image_index)
        if not keys:
            return
        sample = self._render("s3_key", 0, 0)
        others = {"run_id": replace(self, run_id=self.run_id + "~another-run")}
        if self.map_index >= 0:
            others["map_index"] = replace(self, map_index=self.map_index + 1)
        others["task_id"] = replace(self, task_id=self.task_id + "~another-task")
        others["dag_id"] = replace(self, dag_id=self.dag_id + "~another-dag")
        for field_name, other in others.items():
            if other._render("s3_key", 0, 0) == sample:
                raise JiMengConfigurationError(
                    "s3_key",
                    f"would give the same key {sample!r} to another {field_name.replace('_', ' ')}'s image, "
                    f"so one would overwrite the other's copy; allowed: a template with {{{field_name}}} "
                    "(unabridged) in it",
                )

    def _render(self, parameter: str, prompt_index: int, image_index: int) -> str:
        try:
            key = self.publication_key(prompt_index, image_index) or ""
        except (ValueError, IndexError, KeyError, AttributeError, TypeError) as error:
            raise JiMengConfigurationError(
                parameter,
                f"does not render for prompt {prompt_index} image {image_index} ({type(error).__name__}: "
                f"{str(error)[:120]}); allowed: fields such as {{prompt_index:03d}} with formats that fit them",
            ) from None
        if not key.strip("/"):
            raise JiMengConfigurationError(parameter, "renders to an empty key; allowed: a non-empty key template")
        if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise JiMengConfigurationError(parameter, f"renders a key longer than {MAX_KEY_BYTES} bytes")
        if self.scheme != "s3" and any(part in ("", ".", "..") for part in key.split("/")):
            # A filesystem path resolves these (file:///data/x/../y is /data/y): the key would leave its place.
            raise JiMengConfigurationError(
                parameter, f"renders {key!r}; allowed under output_path: keys without '.', '..' or empty segments"
            )
        if key.startswith(self.task_prefix + "/"):
            raise JiMengConfigurationError(
                parameter,
                f"renders {key!r}, inside the task's own keyspace ({self.task_prefix}/), which it keeps for its "
                "records, journals and canonical images; allowed: a key outside it",
            )
        if self.scheme in LOCAL_SCHEMES:
            self._check_local_path(parameter, key)
        return key

    def _check_local_path(self, parameter: str, key: str) -> None:
        """A key a local filesystem can hold: no NUL, each name within 255 bytes (the last one while it is
        written under its temporary name, 19 bytes longer), the whole path within 4,095."""
        shown = key if len(key) <= 120 else f"{key[:60]}...{key[-40:]}"
        if "\x00" in key:
            raise JiMengConfigurationError(
                parameter, f"renders a path with a NUL character ({shown!r}); allowed: names without NUL"
            )
        path = f"/{self.bucket}/{key}" if self.bucket else f"/{key}"
        if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            raise JiMengConfigurationError(
                parameter, f"renders a path longer than {MAX_PATH_BYTES} bytes ({shown!r}); allowed: shorter paths"
            )
        names = key.split("/")
        for position, name in enumerate(names):
            size = len(name.encode("utf-8", "surrogatepass"))
            limit = MAX_NAME_BYTES - (PARTIAL_NAME_OVERHEAD if position == len(names) - 1 else 0)
            if size > limit:
                raise JiMengConfigurationError(
                    parameter,
                    f"renders a path whose name {name[:40]!r}... is {size} bytes; allowed on a local filesystem: "
                    f"at most {limit} bytes per name ({MAX_NAME_BYTES}, less {PARTIAL_NAME_OVERHEAD} for the "
                    "temporary name a file is written under)"
                    if position == len(names) - 1
                    else f"renders a path whose directory name {name[:40]!r}... is {size} bytes; allowed on a local "
                    f"filesystem: at most {MAX_NAME_BYTES} bytes per name",
                )


def prompt_fingerprint(body: Mapping[str, Any]) -> str:
    """What makes two requests the same work: a stored result is reused only when this matches."""
    relevant = {k: v for k, v in body.items() if k not in ("stream", "response_format")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
