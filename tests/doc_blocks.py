"""The ```python and ```bash blocks of README.md and docs/*.md, and what each page says about running them.

A block runs as written unless an HTML comment on the line before its fence says otherwise (the code
host and the site show nothing of it):

* ``<!-- not run: why -->``: illustrative only (needs a real key, the network, a service of your own...);
* ``<!-- excerpt of: dags_examples/x.py -->``: lines of a file the suite runs; its lines must be there;
* ``<!-- runs after: <prelude> -->``: a snippet that uses names defined elsewhere on the page; it runs
  after the named prelude below (``PRELUDES``).

Without a comment, a Python block with its imports and a ``with DAG(`` is a complete DAG file (run with
``dag.test()``), any other Python block a script, and a bash block a command run offline against the
emulator (``tests/packaging/test_doc_blocks.py``). No Airflow import here: ``tests/conftest.py`` uses it
before Airflow is configured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<language>python|bash)\n(?P<code>.*?)^```$", re.M | re.S)
MARKER = re.compile(r"^<!-- (?P<kind>not run|excerpt of|runs after): (?P<note>.+?) -->$")

_DAG_HEADER = (
    "from airflow.sdk import DAG, Param, task\n"
    "from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator\n"
)
#: Snippets of a DAG: the names the pages' DAG snippets use, defined as a DAG author would have them.
#: ``{block}`` is the page's block, inside the DAG's ``with``.
PRELUDES: dict[str, str] = {
    "a DAG with prompts": _DAG_HEADER
    + """

@task
def build_prompts() -> list[str]:
    return ["studio photo of a mug", "studio photo of a lamp"]


@task
def load_products() -> list[dict]:
    return [{"name": "mug", "colour": "navy", "style": "flat"}]


with DAG("{dag_id}", schedule=None):
    prompts = build_prompts()
    generate = JiMengGenerateOperator(task_id="upstream_generate", prompt=prompts, s3_bucket="my-images")
{block}
""",
    # Scripts: run against the emulator (``jimeng_default``).
    "a hook and its result": """
from airflow_provider_jimeng.hooks.jimeng import JiMengHook

hook = JiMengHook("jimeng_default")
result = hook.generate_images("a lighthouse at dawn, watercolour", size="1K")
{block}
hook.close()
""",
}


@dataclass(frozen=True)
class Block:
    page: Path
    index: int  # the block's place among the page's python and bash blocks, from 1
    line: int
    language: str
    code: str
    kind: str  # "run", "not run", "excerpt of", "runs after"
    note: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def module(self) -> str:
        """A module name for the block's file: ``doc_<page>_<index>``."""
        return "doc_" + re.sub(r"\W", "_", self.page.stem.lower()) + f"_{self.index}"

    @property
    def is_dag_file(self) -> bool:
        """A complete DAG file as written: its imports and a ``with DAG(`` at the top level."""
        return (
            self.language == "python"
            and self.kind == "run"
            and re.search(r"^from airflow\.sdk import .*\bDAG\b", self.code, re.M) is not None
            and re.search(r"^with DAG\(", self.code, re.M) is not None
        )

    def with_prelude(self) -> str:
        """The block after its prelude (``runs after``), indented into the prelude's DAG where it has one."""
        prelude = PRELUDES[self.note]
        block = self.code
        if "with DAG(" in prelude:
            block = "".join(f"    {line}" if line.strip() else line for line in block.splitlines(keepends=True))
        return prelude.replace("{dag_id}", self.module).replace("{block}", block)


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for index, match in enumerate(FENCE.finditer(text), start=1):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.match(before)
            found.append(
                Block(
                    page=page,
                    index=index,
                    line=text.count("\n", 0, match.start()) + 1,
                    language=match["language"],
                    code=match["code"],
                    kind=marker["kind"] if marker else "run",
                    note=marker["note"] if marker else "",
                )
            )
    return found


def dag_files() -> dict[str, str]:
    """``{module: source}`` of every complete DAG file the pages show, for the suite's DAGs folder."""
    return {block.module: block.code for block in blocks() if block.is_dag_file}
