"""``JiMengReviewOperator``: a person chooses which generated images go downstream (Airflow 3.1+).

Built on Airflow's human-in-the-loop operator (:class:`~airflow.providers.standard.operators.hitl.HITLOperator`):
the task writes a request (one option per image, its thumbnail, prompt and size in the body), then
waits without holding a worker slot until a reviewer answers in the UI's *Required actions* or through
the REST API (``PATCH .../hitlDetails``), or until the deadline takes the default outcome.

The thumbnails in the body are the gallery's routes (``jimeng/thumbnail``): the browser loads them
from the API server with the reviewer's own session, under the gallery's rules (the deployment's
``[jimeng] gallery_storage`` roots, Airflow's permissions on the task instance and its XComs). The
request holds no bucket name, key or signed URL.

Downstream tasks get small, typed things: ``return_value`` is the list of approved image URIs (the
shape of the generation task's own, so ``publish.expand(uri=review.output)`` works), the ``review``
XCom is the whole decision (:class:`ReviewDecision`), and the ``regenerate`` XCom holds one set of
keyword arguments per image to take again, for ``JiMengGenerateOperator.partial(...).expand_kwargs``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypedDict
from urllib.parse import urlencode

from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict

from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.links.jimeng import GALLERY_URL_PREFIX, JiMengReviewLink
from airflow_provider_jimeng.plugins.gallery_access import StorageRoot
from airflow_provider_jimeng.plugins.gallery_store import Storage, TaskImages, image_entry, read_records
from airflow_provider_jimeng.storage.keys import safe_key_part
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS, AIRFLOW_VERSION

#: What the review needs: Airflow's human-in-the-loop operators came with Airflow 3.1.
REQUIRES = "Airflow 3.1"

if not AIRFLOW_V_3_1_PLUS:  # pragma: no cover - exercised by `make compat` on 3.0
    from airflow.exceptions import AirflowOptionalProviderFeatureException

    # Raised at import, so a DAG using the review fails to parse with this message (a DAG import error).
    raise AirflowOptionalProviderFeatureException(
        f"JiMengReviewOperator needs {REQUIRES} or later (Airflow's human-in-the-loop operators); "
        f"this is Airflow {AIRFLOW_VERSION}. Upgrade Airflow, or review the images outside Airflow."
    )

from airflow.providers.standard.operators.hitl import HITLOperator  # noqa: E402  (3.1+, checked above)

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The option that answers "none of these": Airflow's REST API and UI need at least one option chosen.
PUBLISH_NONE = "Publish none of these"
#: The option that turns the chosen images into requests for another take instead of approvals.
REGENERATE = "Regenerate the chosen images (another take)"
SPECIAL_OPTIONS = (PUBLISH_NONE, REGENERATE)

ON_TIMEOUT = ("fail", "approve_none", "approve_all")
REJECTED_POLICIES = ("keep", "tag", "move")
#: The tag a rejected image gets with ``rejected="tag"`` (S3 object tagging).
REJECTED_TAG = ("jimeng-review", "rejected")
#: Most images one review asks about (the options list and the body stay readable).
MAX_REVIEW_IMAGES = 200
#: A prompt longer than this is cut in an option's label (the body shows it whole).
LABEL_PROMPT_CHARS = 60
#: A take number already in a key prefix: ``.../take_2/...``.
_TAKE = re.compile(r"(?:^|/)take_(\d{1,6})(?:/|$)")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


class ImageChoice(TypedDict):
    """One reviewed image as downstream tasks read it."""

    uri: str
    key: str
    task_id: str
    map_index: int
    prompt_index: int
    image_index: int
    prompt: str | None
    size: str | None
    take: int


class RegenerateRequest(TypedDict):
    """Keyword arguments for ``JiMengGenerateOperator.partial(...).expand_kwargs``: one new take of one prompt."""

    prompt: str
    size: str | None
    s3_key_prefix: str


@dataclass(frozen=True)
class ReviewItem:
    """One image offered to the reviewer: where it came from and how it is labelled."""

    number: int
    task_id: str
    map_index: int
    #: The image's position in its task instance's ``images`` XCom (the gallery's ``n``).
    position: int
    uri: str
    key: str
    prompt_index: int
    image_index: int
    prompt: str | None
    size: str | None
    take: int
    #: The connection the generation task stored through (its ``storage`` XCom), for the rejected policy.
    conn_id: str | None = None

    @property
    def label(self) -> str:
        prompt = " ".join((self.prompt or f"prompt {self.prompt_index}").split())
        if len(prompt) > LABEL_PROMPT_CHARS:
            prompt = prompt[: LABEL_PROMPT_CHARS - 1].rstrip() + "…"
        return f"#{self.number} {prompt}" + (f" ({self.size})" if self.size else "")

    def choice(self) -> ImageChoice:
        return ImageChoice(
            uri=self.uri,
            key=self.key,
            task_id=self.task_id,
            map_index=self.map_index,
            prompt_index=self.prompt_index,
            image_index=self.image_index,
            prompt=self.prompt,
            size=self.size,
            take=self.take,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReviewItem:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})  # type: ignore[arg-type]


@dataclass
class ReviewDecision:
    """The whole decision, pushed as the ``review`` XCom: what was chosen, by whom, when, and what was done."""

    approved: list[ImageChoice]
    rejected: list[ImageChoice]
    regenerate: list[ImageChoice]
    #: ``{"id": ..., "name": ...}`` of the reviewer; ``None`` when the deadline took the default outcome.
    decided_by: dict[str, str] | None
    #: ISO 8601 (UTC) time of the answer (or of the deadline).
    decided_at: str | None
    timed_out: bool
    note: str
    #: What happened to the rejected images: ``keep``, ``tag`` or ``move`` (``keep`` after a deadline).
    rejected_action: str
    #: Where each moved image went (``rejected="move"``): original URI -> new URI.
    moved: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def markdown_text(text: str) -> str:
    """``text`` shown literally by a Markdown renderer (a prompt must not become a link or a heading)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def gallery_image_url(route: str, item: ReviewItem, dag_id: str, run_id: str) -> str:
    """The gallery's route for one image, relative: the UI's ``<base href>`` puts Airflow's base path first."""
    query = urlencode(
        {"dag_id": dag_id, "run_id": run_id, "task_id": item.task_id, "map_index": item.map_index, "n": item.position}
    )
    return f"{GALLERY_URL_PREFIX.lstrip('/')}/{route}?{query}"


def note_param() -> Param:
    """The free-text note a reviewer may leave (a task-level param: HITL shows task params only)."""
    param = Param("", type=["null", "string"], title="Note", description="Optional: why, or what to change")
    param.source = "task"
    return param


def with_note(params: Any) -> ParamsDict:
    """The task's params (Airflow has merged the DAG's in already) with the reviewer's note added."""
    merged = params if isinstance(params, ParamsDict) else ParamsDict(params or {})
    if "note" not in merged or getattr(merged.get_param("note"), "source", "task") != "task":
        merged["note"] = note_param()
    return merged


def take_of(prefix: str) -> int:
    """The take number a storage prefix carries (``.../take_2/...``); 1 for a first generation."""
    found = _TAKE.findall(prefix)
    return int(found[-1]) if found else 1


class JiMengReviewOperator(HITLOperator):
    """Ask a person which generated images to publish; push the approved URIs for downstream tasks.

    :param images_from: the generation task(s) whose images are reviewed: a task id, an operator (a
        mapped one too: every map index is reviewed), a ``@task.jimeng`` task's output, or a list of
        them. Operators and outputs given here become upstream tasks of the review.
    :param subject: the request's headline in *Required actions*. (templated)
    :param body: Markdown shown above the images (the images, prompts and sizes follow). (templated)
    :param respondents: user ids who may answer (Airflow's HITL ``assigned_users``); ``None``: anyone
        Airflow lets update the task's human-in-the-loop detail.
    :param response_timeout: the deadline; after it ``on_timeout`` decides.
    :param on_timeout: ``fail`` (default: the task fails, nothing is published), ``approve_none`` or
        ``approve_all``.
    :param rejected: what happens to the images not approved: ``keep`` (default), ``tag`` (S3 object
        tag ``jimeng-review=rejected``) or ``move`` (under ``rejected_prefix`` in the same bucket).
        Nothing is deleted unless ``move`` is asked for; after a deadline with nobody's answer the
        images are always kept.
    :param rejected_prefix: where ``move`` puts rejected images: ``<rejected_prefix><original key>``.
    :param allow_regenerate: offer "Regenerate the chosen images": the chosen images' prompts go to the
        ``regenerate`` XCom (one take more each) instead of being approved.
    :param takes_prefix: the ``s3_key_prefix`` root of new takes: ``<takes_prefix>/take_<n>/...``.
    :param storage_conn_id: the connection ``tag``/``move`` use; ``None``: the one each generation task
        stored through (its ``storage`` XCom).
    """

    template_fields: Sequence[str] = ("subject", "body", "rejected_prefix", "takes_prefix")
    ui_color = "#fff4e0"
    operator_extra_links = (JiMengReviewLink(),)

    def __init__(
        self,
        *,
        images_from: Any,
        subject: str = "Choose the images to publish",
        body: str | None = None,
        respondents: str | Sequence[str] | None = None,
        response_timeout: timedelta | None = None,
        on_timeout: Literal["fail", "approve_none", "approve_all"] | str = "fail",
        rejected: Literal["keep", "tag", "move"] | str = "keep",
        rejected_prefix: str = "rejected/",
        allow_regenerate: bool = True,
        takes_prefix: str = "jimeng/takes",
        storage_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        given = [images_from] if isinstance(images_from, str) or not isinstance(images_from, Sequence) else images_from
        # A TaskFlow task's output (``@task.jimeng``) stands for its task.
        sources = [getattr(source, "operator", source) for source in given]
        if respondents is not None and "assigned_users" not in kwargs:
            names = [respondents] if isinstance(respondents, str) else list(respondents)
            kwargs["assigned_users"] = [{"id": str(name), "name": str(name)} for name in names]
        kwargs["params"] = with_note(kwargs.get("params"))
        # The options are the images, known once the generation ran: execute() sets them.
        super().__init__(
            subject=subject,
            body=body,
            options=list(SPECIAL_OPTIONS),
            multiple=True,
            response_timeout=response_timeout,
            **kwargs,
        )
        self.images_from = [source if isinstance(source, str) else source.task_id for source in sources]
        for source in sources:
            if not isinstance(source, str):
                self.set_upstream(source)
        self.on_timeout = on_timeout
        self.rejected = rejected
        self.rejected_prefix = rejected_prefix
        self.allow_regenerate = allow_regenerate
        self.takes_prefix = takes_prefix
        self.storage_conn_id = storage_conn_id

    # --------------------------------------------------------------------------------- checks
    def _check_parameters(self) -> None:
        if self.on_timeout not in ON_TIMEOUT:
            raise JiMengConfigurationError("on_timeout", f"is {self.on_timeout!r}; allowed: {', '.join(ON_TIMEOUT)}")
        if self.rejected not in REJECTED_POLICIES:
            raise JiMengConfigurationError(
                "rejected", f"is {self.rejected!r}; allowed: {', '.join(REJECTED_POLICIES)} (nothing is deleted)"
            )
        prefix = self.rejected_prefix
        if not isinstance(prefix, str) or not prefix.strip("/") or ".." in prefix.split("/"):
            raise JiMengConfigurationError(
                "rejected_prefix", f"is {prefix!r}; allowed: a non-empty key prefix such as 'rejected/'"
            )
        if not isinstance(self.takes_prefix, str) or not self.takes_prefix.strip("/"):
            raise JiMengConfigurationError("takes_prefix", f"is {self.takes_prefix!r}; allowed: a non-empty key prefix")
        if not self.images_from or not all(isinstance(task_id, str) and task_id for task_id in self.images_from):
            raise JiMengConfigurationError("images_from", "allowed: a generation task, its id, or a list of them")
        for task_id in self.images_from:
            if self.dag is not None and not self.dag.has_task(task_id):
                raise JiMengConfigurationError("images_from", f"names {task_id!r}, which is not a task of this DAG")

    # ---------------------------------------------------------------------------------- items
    def collect_items(self, context: Context) -> list[ReviewItem]:
        """Every stored image of the generation task instances, numbered from 1 in task and map order."""
        ti = context["ti"]
        items: list[ReviewItem] = []
        for task_id in self.images_from:
            task = self.dag.get_task(task_id) if self.dag is not None else None
            if task is not None and getattr(task, "is_mapped", False):
                count = ti.get_ti_count(dag_id=ti.dag_id, task_ids=[task_id], run_ids=[ti.run_id])
                indexes: list[int] = list(range(count))
            else:
                indexes = [-1]
            for map_index in indexes:
                images = ti.xcom_pull(task_ids=task_id, key="images", map_indexes=map_index)
                storage_value = ti.xcom_pull(task_ids=task_id, key="storage", map_indexes=map_index)
                items.extend(self._task_items(task_id, map_index, images, storage_value, start=len(items) + 1))
        if len(items) > MAX_REVIEW_IMAGES:
            raise JiMengConfigurationError(
                "images_from",
                f"holds {len(items)} images; one review asks about at most {MAX_REVIEW_IMAGES}: split the review",
            )
        return items

    @staticmethod
    def _task_items(task_id: str, map_index: int, images: Any, storage_value: Any, *, start: int) -> list[ReviewItem]:
        """One task instance's images, read as the gallery reads them (records.json gives the prompts)."""
        entries = images if isinstance(images, list) else []
        storage = Storage.from_xcom(storage_value)
        prefix = storage_value.get("prefix") if isinstance(storage_value, Mapping) else None
        conn_id = storage_value.get("conn_id") if isinstance(storage_value, Mapping) else None
        # The worker reads its own DAG's records through the connection the task stored with.
        roots = (StorageRoot(prefix, conn_id if isinstance(conn_id, str) else None),) if isinstance(prefix, str) else ()
        task = TaskImages(
            map_index=map_index, images=[image_entry(e) for e in entries], storage=storage, usage={}, roots=roots
        )
        read_records(task)
        take = take_of(prefix or "")
        found: list[ReviewItem] = []
        for position, stored in enumerate(task.images):
            if stored is None:
                continue
            record = task.records.get(stored.prompt_index)
            found.append(
                ReviewItem(
                    number=start + len(found),
                    task_id=task_id,
                    map_index=map_index,
                    position=position,
                    uri=stored.uri,
                    key=stored.key,
                    prompt_index=stored.prompt_index,
                    image_index=stored.image_index,
                    prompt=record.prompt if record is not None else None,
                    size=stored.size,
                    take=take,
                    conn_id=conn_id if isinstance(conn_id, str) else None,
                )
            )
        return found

    def render_body(self, items: Sequence[ReviewItem], dag_id: str, run_id: str) -> str:
        """Markdown: each image's thumbnail (linking the full image), its number, size and prompt."""
        lines = [self.body.strip(), ""] if self.body else []
        lines.append(
            f"Tick the images to publish ({len(items)} in all). "
            f'"{PUBLISH_NONE}" approves none'
            + (f'; "{REGENERATE}" asks for another take of the ticked ones instead.' if self.allow_regenerate else ".")
        )
        for item in items:
            thumbnail = gallery_image_url("thumbnail", item, dag_id, run_id)
            full = gallery_image_url("image", item, dag_id, run_id)
            lines += [
                "",
                f"**#{item.number}**"
                + (f" · {markdown_text(item.size)}" if item.size else "")
                + f" · take {item.take}",
                "",
                f"[![image #{item.number}]({thumbnail})]({full})",
                "",
                "> "
                + (markdown_text(item.prompt) if item.prompt else f"(prompt {item.prompt_index}: text not readable)"),
            ]
        return "\n".join(lines)

    def _set_options(self, items: Sequence[ReviewItem]) -> None:
        labels = [item.label for item in items]
        self.options = [*labels, PUBLISH_NONE, *([REGENERATE] if self.allow_regenerate else [])]
        self.defaults = {"fail": None, "approve_none": [PUBLISH_NONE], "approve_all": labels}[self.on_timeout]

    # -------------------------------------------------------------------------------- execute
    def execute(self, context: Context) -> Any:
        self._check_parameters()
        items = self.collect_items(context)
        ti = context["ti"]
        if not items:
            self.log.info("Nothing to review: %s stored no image", ", ".join(self.images_from))
            decision = ReviewDecision([], [], [], None, None, False, "", "keep")
            return self._push(context, decision)
        if self.rejected == "tag" and any(not item.uri.startswith("s3://") for item in items):
            raise JiMengConfigurationError("rejected", "'tag' needs images in S3 (object tags); allowed: keep, move")
        if self.rejected == "move" and any(not item.uri.startswith("s3://") for item in items):
            raise JiMengConfigurationError("rejected", "'move' needs images in S3; allowed here: keep")
        self._set_options(items)
        self.body = self.render_body(items, ti.dag_id, ti.run_id)
        ti.xcom_push(key="review_items", value=[asdict(item) for item in items])
        self.log.info("Asking for a review of %d image(s)", len(items))
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        ti = context["ti"]
        stored = ti.xcom_pull(task_ids=self.task_id, key="review_items", map_indexes=ti.map_index) or []
        items = [ReviewItem.from_json(entry) for entry in stored]
        self._set_options(items)
        if "error" in event and event.get("error_type") == "timeout":
            self.log.error("Nobody answered the review before the deadline (on_timeout='fail'): nothing is published")
        payload = super().execute_complete(context, event)
        chosen = set(payload["chosen_options"])
        picked = [item for item in items if item.label in chosen]
        regenerate: list[ReviewItem] = []
        # "Publish none" counts only alone: the UI pre-selects the defaults (on_timeout="approve_none"), so a
        # reviewer who picks images may leave it selected; the images picked are what they mean.
        if REGENERATE in chosen:
            approved: list[ReviewItem] = []
            regenerate = picked
        else:
            approved = picked
        approved_uris = {item.uri for item in approved}
        rejected = [item for item in items if item.uri not in approved_uris]
        user = payload.get("responded_by_user")
        timed_out = bool(event.get("timedout")) or user is None
        responded_at = payload.get("responded_at")
        note = (payload.get("params_input") or {}).get("note") or ""
        decision = ReviewDecision(
            approved=[item.choice() for item in approved],
            rejected=[item.choice() for item in rejected],
            regenerate=[item.choice() for item in regenerate],
            decided_by={"id": str(user["id"]), "name": str(user["name"])} if user else None,
            decided_at=responded_at.isoformat() if hasattr(responded_at, "isoformat") else responded_at,
            timed_out=timed_out,
            note=str(note),
            rejected_action="keep" if timed_out else str(self.rejected),
        )
        self.log.info(
            "Review by %s: %d approved, %d rejected, %d to take again",
            decision.decided_by["name"] if decision.decided_by else f"the deadline ({self.on_timeout})",
            len(approved),
            len(rejected),
            len(regenerate),
        )
        if rejected and decision.rejected_action != "keep":
            decision.moved = self._apply_rejected_policy(rejected, decision.rejected_action)
        return self._push(context, decision, regenerate)

    def _push(self, context: Context, decision: ReviewDecision, regenerate: Sequence[ReviewItem] = ()) -> list[str]:
        ti = context["ti"]
        ti.xcom_push(key="review", value=decision.to_json())
        ti.xcom_push(key="regenerate", value=[self.regenerate_request(item) for item in regenerate])
        if isinstance(summary := getattr(self, "hitl_summary_extra", None), dict):  # newer standard providers
            summary["approved"] = len(decision.approved)
        return [choice["uri"] for choice in decision.approved]

    def regenerate_request(self, item: ReviewItem) -> RegenerateRequest:
        """The next take of ``item``'s prompt, under a prefix of its own: a take stored already is reused, not paid."""
        source = f"{safe_key_part(item.task_id)}/map_{item.map_index}/p{item.prompt_index:04d}"
        return RegenerateRequest(
            prompt=item.prompt or "",
            size=item.size,
            s3_key_prefix=f"{self.takes_prefix.strip('/')}/take_{item.take + 1}/{source}",
        )

    # ---------------------------------------------------------------------------- rejected
    def _apply_rejected_policy(self, rejected: Sequence[ReviewItem], action: str) -> dict[str, str]:
        """Tag or move the rejected images (S3); never deletes anything but a moved image's old copy."""
        from botocore.exceptions import ClientError

        from airflow_provider_jimeng.storage.s3 import bounded_s3_hook
        from airflow_provider_jimeng.storage.thumbnails import thumbnail_key

        moved: dict[str, str] = {}
        clients: dict[str | None, Any] = {}
        for item in rejected:
            conn_id = self.storage_conn_id or item.conn_id
            if conn_id not in clients:
                clients[conn_id] = bounded_s3_hook(conn_id).get_conn()
            client = clients[conn_id]
            bucket, _, key = item.uri.removeprefix("s3://").partition("/")
            if action == "tag":
                tags = client.get_object_tagging(Bucket=bucket, Key=key).get("TagSet", [])
                tags = [tag for tag in tags if tag.get("Key") != REJECTED_TAG[0]]
                tags.append({"Key": REJECTED_TAG[0], "Value": REJECTED_TAG[1]})
                client.put_object_tagging(Bucket=bucket, Key=key, Tagging={"TagSet": tags})
                continue
            target = f"{self.rejected_prefix.strip('/')}/{key}"
            for source_key, target_key in ((key, target), (thumbnail_key(key), thumbnail_key(target))):
                try:
                    client.copy_object(Bucket=bucket, Key=target_key, CopySource={"Bucket": bucket, "Key": source_key})
                except ClientError as error:
                    if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404") and source_key != key:
                        continue  # no stored thumbnail
                    if source_key == key and _exists(client, bucket, target_key):
                        break  # moved by an earlier try
                    raise
                client.delete_object(Bucket=bucket, Key=source_key)
            moved[item.uri] = f"s3://{bucket}/{target}"
        self.log.info("Rejected images: %s %d", "tagged" if action == "tag" else "moved", len(rejected))
        return moved


def _exists(client: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True
