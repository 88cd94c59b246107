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
keyword arguments per image to take again, for ``JiMengGenerateOperator.partial(...).expand_kwargs``,
each on the map index where this run stored its take already, if it did (:func:`arrange_takes`).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypedDict
from urllib.parse import urlencode

from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict

from airflow_provider_jimeng.exceptions import JiMengConfigurationError, JiMengStorageError
from airflow_provider_jimeng.links.jimeng import GALLERY_URL_PREFIX, JiMengReviewLink
from airflow_provider_jimeng.plugins.gallery_access import StorageRoot
from airflow_provider_jimeng.plugins.gallery_store import Storage, TaskImages, image_entry, read_records
from airflow_provider_jimeng.storage.keys import check_bucket_name, safe_key_part
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS, AIRFLOW_VERSION

log = logging.getLogger(__name__)

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
#: A mapped take task's segment of its keyspace: ``.../<take task>/map_<k>/...``.
_MAP_SEGMENT = re.compile(r"^map_(\d{1,9})$")
#: Listings of one request's stored takes (1,000 keys each): a take task instance holds a handful of objects.
MAX_TAKE_LISTING_PAGES = 5
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


class KeptTake(TypedDict):
    """A take stored at a map index of the take task, not asked for again but kept there (reused, not paid)."""

    map_index: int
    prompt: str
    s3_key_prefix: str


@dataclass(frozen=True)
class TakePlan:
    """Which request each map index of the take task gets (by ``s3_key_prefix``), from :func:`arrange_takes`."""

    requests: list[str]
    #: Map indexes holding a stored take nobody asked for this time: kept so that no other prompt lands there.
    kept: list[int]
    #: Map indexes where a stored take had to go elsewhere (to fill a gap): it is generated (paid) again.
    moved: list[int]


def arrange_takes(asked: Sequence[str], stored: Mapping[int, str]) -> TakePlan:
    """Place the requests ``asked`` for (``s3_key_prefix`` each) on the map indexes of the take task.

    The take task's keyspace holds its map index, so a request is reused only where it was stored:
    ``stored`` says which request each occupied map index holds. An asked request stored already
    goes back to its index (reused, not paid); a new one takes the lowest index nothing was stored
    at. The list ends with the last asked request; an occupied index before it keeps its own request
    although nobody asked for it (it is reused, and no other prompt's take lands there). A free index
    before it that no new request fills (a take instance that stored nothing, below one that did) is
    filled with the last request, which is then generated again: the only case that pays for a take
    stored already.
    """
    waiting: dict[str, list[int]] = {}
    for index in sorted(stored):
        waiting.setdefault(stored[index], []).append(index)
    placed: dict[int, str] = {}
    new: list[str] = []
    for request in asked:
        indexes = waiting.get(request)
        if indexes:
            placed[indexes.pop(0)] = request
        else:
            new.append(request)
    free = (index for index in itertools.count() if index not in stored)
    for request in new:
        placed[next(free)] = request
    moved: list[int] = []
    while True:
        length = max(placed, default=-1) + 1
        gap = next((index for index in range(length) if index not in placed and index not in stored), None)
        if gap is None:
            break
        top = max(placed)
        placed[gap] = placed.pop(top)
        moved.append(top)
    kept = [index for index in range(length) if index not in placed]
    return TakePlan([placed[index] if index in placed else stored[index] for index in range(length)], kept, moved)


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
    #: Takes stored by an earlier answer, not asked for now, that keep their map index in ``regenerate``.
    kept_takes: list[KeptTake] = field(default_factory=list)

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
    :param takes_bucket: the bucket the take task stores in, where the review looks for the takes an
        earlier answer made (so that none is paid twice); ``None``: the bucket of the image sent back.
    :param storage_conn_id: the connection ``tag``/``move`` use; ``None``: the one each generation task
        stored through (its ``storage`` XCom).
    """

    template_fields: Sequence[str] = ("subject", "body", "rejected_prefix", "takes_prefix", "takes_bucket")
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
        takes_bucket: str | None = None,
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
        self.takes_bucket = takes_bucket
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
        if self.takes_bucket is not None:
            try:
                check_bucket_name(self.takes_bucket)
            except JiMengConfigurationError as error:
                raise JiMengConfigurationError("takes_bucket", error.detail) from None
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
        # Before anything is moved: a storage that cannot be listed fails the task with nothing changed.
        requests, decision.kept_takes = self.plan_takes(context, items, regenerate)
        if rejected and decision.rejected_action != "keep":
            decision.moved = self._apply_rejected_policy(rejected, decision.rejected_action)
        return self._push(context, decision, requests)

    def _push(
        self, context: Context, decision: ReviewDecision, requests: Sequence[RegenerateRequest] = ()
    ) -> list[str]:
        ti = context["ti"]
        ti.xcom_push(key="review", value=decision.to_json())
        ti.xcom_push(key="regenerate", value=list(requests))
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

    # ------------------------------------------------------------------------------- takes
    def plan_takes(
        self, context: Context, items: Sequence[ReviewItem], regenerate: Sequence[ReviewItem]
    ) -> tuple[list[RegenerateRequest], list[KeptTake]]:
        """The ``regenerate`` list: each request on the map index of the take task where its take is stored.

        The take task maps over this list, and its keyspace holds its map index: a request that moved
        to another index (a cleared review answered in another order, or with fewer or more images)
        would find nothing stored there and be paid again. So the list is built around what this run
        stored already (:func:`arrange_takes`); takes kept though not asked for again are returned too.
        """
        if not regenerate:
            return [], []
        candidates: dict[str, tuple[RegenerateRequest, ReviewItem]] = {}
        for item in items:
            request = self.regenerate_request(item)
            candidates.setdefault(request["s3_key_prefix"], (request, item))
        asked = [self.regenerate_request(item)["s3_key_prefix"] for item in regenerate]
        stored = self._stored_takes(context, {prefix: item for prefix, (_, item) in candidates.items()}, set(asked))
        plan = arrange_takes(asked, stored)
        requests = [candidates[prefix][0] for prefix in plan.requests]
        kept = [
            KeptTake(map_index=index, prompt=requests[index]["prompt"], s3_key_prefix=requests[index]["s3_key_prefix"])
            for index in plan.kept
        ]
        reused = sum(1 for index, prefix in enumerate(plan.requests) if stored.get(index) == prefix) - len(kept)
        self.log.info(
            "Takes: %d request(s), %d at the map index holding their stored take (not paid again), %d kept there "
            "though not asked for again (map indexes %s)",
            len(requests),
            reused,
            len(kept),
            plan.kept,
        )
        for index in plan.moved:
            self.log.warning(
                "The take stored at map index %d of the take task goes to a lower index (a free one below it "
                "stored nothing): it is generated again there",
                index,
            )
        return requests, kept

    def _stored_takes(self, context: Context, sources: Mapping[str, ReviewItem], asked: set[str]) -> dict[int, str]:
        """Which request (``s3_key_prefix``) each map index of the take task holds, from this run's stored keys.

        A take task instance's keys are ``<s3_key_prefix>/<dag>/<run>/<take task>/map_<k>/...``: records,
        journals (a take that failed after paying has one) or images, anything there occupies ``k``. One
        bounded listing per request the review could make; nothing is read.
        """
        ti = context["ti"]
        run_part = f"{safe_key_part(ti.dag_id)}/{safe_key_part(ti.run_id)}/"
        claims: dict[int, set[str]] = {}
        clients: dict[str | None, Any] = {}
        elsewhere = 0
        for prefix, item in sources.items():
            if self.takes_bucket is not None:
                bucket = str(self.takes_bucket)
            elif item.uri.startswith("s3://"):
                bucket = item.uri.removeprefix("s3://").partition("/")[0]
            else:
                elsewhere += 1
                continue
            conn_id = self.storage_conn_id or item.conn_id
            if conn_id not in clients:
                from airflow_provider_jimeng.storage.s3 import bounded_s3_hook

                clients[conn_id] = bounded_s3_hook(conn_id).get_conn()
            listed = f"{prefix}/{run_part}"
            for key in _list_take_keys(clients[conn_id], bucket, listed):
                task_part, _, rest = key[len(listed) :].partition("/")
                found = _MAP_SEGMENT.match(rest.partition("/")[0])
                if task_part and found:
                    claims.setdefault(int(found[1]), set()).add(prefix)
        if elsewhere:
            self.log.info(
                "Takes of %d prompt(s) not looked for: their images are not in S3 (no takes_bucket)", elsewhere
            )
        stored: dict[int, str] = {}
        for index, prefixes in sorted(claims.items()):
            # Asked ones first (kept where they are stored, so not paid again), then in key order.
            ordered = sorted(prefixes, key=lambda prefix: (prefix not in asked, prefix))
            stored[index] = ordered[0]
            if len(ordered) > 1:
                self.log.warning(
                    "Map index %d of the take task holds takes of %d requests (%s): keeping %s there; the "
                    "others, if asked for, go to a free index and are generated again",
                    index,
                    len(ordered),
                    ", ".join(ordered),
                    ordered[0],
                )
        return stored

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


def _list_take_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """The keys under ``prefix`` (at most :data:`MAX_TAKE_LISTING_PAGES` listings); a failure stops the review."""
    keys: list[str] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    try:
        for _ in range(MAX_TAKE_LISTING_PAGES):
            answer = client.list_objects_v2(**kwargs)
            keys.extend(item["Key"] for item in answer.get("Contents", []) if isinstance(item.get("Key"), str))
            if not answer.get("IsTruncated"):
                return keys
            kwargs["ContinuationToken"] = answer["NextContinuationToken"]
    except Exception as error:
        from airflow_provider_jimeng.storage.s3 import _describe

        raise JiMengStorageError(
            f"listing s3://{bucket}/{prefix} failed: {_describe(error)}; the review cannot tell which takes this "
            "run stored already, and sends no request rather than risk paying for one twice (clear the review "
            "task to ask again)"
        ) from None
    log.warning(
        "More than %d pages of keys under s3://%s/%s: the rest were not looked at",
        MAX_TAKE_LISTING_PAGES,
        bucket,
        prefix,
    )
    return keys


def _exists(client: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True
