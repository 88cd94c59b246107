"""``@task.jimeng``: a Python function builds the prompt(s); the task then runs as the operator."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import (
    DecoratedOperator,
    TaskDecorator,
    context_merge,
    determine_kwargs,
    task_decorator_factory,
)

from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.options import MAX_EXTRA_BODY_DEPTH, nested_deeper_than

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Parameters the decorated function may set by returning a dict (``deferrable`` is how the task runs,
#: chosen where it is declared: it decides what the try does before the function could be called again).
RETURNABLE_PARAMETERS = frozenset(
    name
    for name in inspect.signature(JiMengGenerateOperator.__init__).parameters
    if name not in ("self", "kwargs", "jimeng_conn_id", "aws_conn_id", "output_conn_id", "deferrable")
)


class _JiMengDecoratedOperator(DecoratedOperator, JiMengGenerateOperator):
    """Calls the function with upstream values, then generates from what it returned.

    The function returns a prompt, a list of prompts, or a dict of operator parameters that must
    include ``prompt``. Returned prompts are used as they are: they are not rendered as Jinja, so
    upstream data containing braces cannot inject template code.
    """

    template_fields: Sequence[str] = (*DecoratedOperator.template_fields, *JiMengGenerateOperator.template_fields)
    template_fields_renderers: ClassVar[dict[str, str]] = {
        **DecoratedOperator.template_fields_renderers,
        **JiMengGenerateOperator.template_fields_renderers,
    }
    # Both parents name attributes that must not be deep-copied (the callable; the operator's thread events).
    shallow_copy_attrs: Sequence[str] = (
        *DecoratedOperator.shallow_copy_attrs,
        *JiMengGenerateOperator.shallow_copy_attrs,
    )
    custom_operator_name: str = "@task.jimeng"
    overwrite_rtif_after_execution: bool = True

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("prompt", None)
        super().__init__(python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs, **kwargs)

    def execute(self, context: Context) -> Any:
        self._apply_function(context)
        return JiMengGenerateOperator.execute(self, context)

    def execute_complete(
        self, context: Context, event: Mapping[str, Any] | None = None, fields: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Resumed from a deferral: with what the function set before (carried in the deferral's kwargs).

        ``dag.test()`` drops those kwargs (Airflow's triggerer keeps them): the function is called again
        then. Its prompts must match the journaled ones to be collected; nothing is ever submitted here.
        """
        if fields is None:
            self._apply_function(context)
            fields = self._deferred_fields
        return JiMengGenerateOperator.execute_complete(self, context, event, fields)

    def _apply_function(self, context: Context) -> None:
        """Call the function and set what it returned (prompts, or a dict of parameters)."""
        context_merge(context, self.op_kwargs)
        kwargs = determine_kwargs(self.python_callable, self.op_args, context)
        returned = self.python_callable(*self.op_args, **kwargs)
        if returned is None:
            raise JiMengConfigurationError(
                "return value",
                "the function returned None; allowed: a prompt string, a list of prompt strings, "
                "or a dict of operator parameters that includes 'prompt'",
            )
        if isinstance(returned, Mapping):
            unknown = sorted(set(returned) - RETURNABLE_PARAMETERS)
            if unknown:
                raise JiMengConfigurationError(
                    "return value",
                    f"the dict sets unknown parameter(s) {unknown}; "
                    f"allowed: {', '.join(sorted(RETURNABLE_PARAMETERS))}",
                )
            if "prompt" not in returned:
                raise JiMengConfigurationError("return value", "the dict must include 'prompt'")
            for name, value in returned.items():
                if nested_deeper_than(value, MAX_EXTRA_BODY_DEPTH):
                    # Checked before it is set: Airflow walks a task attribute's value (RecursionError).
                    raise JiMengConfigurationError(
                        name,
                        f"is nested deeper than {MAX_EXTRA_BODY_DEPTH} levels; allowed: a JSON object "
                        f"(or value) of at most {MAX_EXTRA_BODY_DEPTH} levels of objects and lists",
                    )
                # None means "as the task was declared" (its default when not given): a function that
                # returns {"max_images_per_task": None} must not lift the cap the task was given.
                if value is not None:
                    setattr(self, name, value)
            if "s3_bucket" in returned:
                # Naming a bucket asks for storage, even when the value is empty: never URLs instead.
                self.storage_requested = True
            if "output_path" in returned:
                self.output_requested = True
            carried = {name: value for name, value in returned.items() if value is not None}
            for flag in ("storage_requested", "output_requested"):
                carried[flag] = getattr(self, flag)
        else:
            self.prompt = returned
            carried = {"prompt": returned}
        # A deferred task resumes in execute_complete without calling the function again: what it set goes along.
        self._deferred_fields = carried


def jimeng_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """Wrap a function that returns prompt(s) into a :class:`JiMengGenerateOperator` task.

    Keyword arguments are operator parameters (``s3_bucket``, ``size``, ``max_concurrency``...).
    """
    # The task's output is always the operator's list of URIs, whatever the function returns: without
    # this, a function annotated ``-> dict`` would make Airflow infer multiple_outputs and fail the task.
    kwargs.pop("multiple_outputs", None)
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=False,
        decorated_operator_class=_JiMengDecoratedOperator,
        **kwargs,
    )
