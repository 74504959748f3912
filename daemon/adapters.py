"""Task adapters: LoRA GGUFs a model carries (jina-embeddings-v3's one per task), their headers
checked, and which one a request gets (pure).

llama.cpp's converter writes jina-embeddings-v3 as a `jina-bert-v3` GGUF and one adapter GGUF per
task (`lora-{task}-<name>.gguf`): `general.type = adapter`, `adapter.type = lora`, the task's LoRA
pairs as `<base tensor>.lora_a` / `.lora_b`, `adapter.lora.alpha`, `adapter.lora.task_name` and
`adapter.lora.prompt_prefix` (the model's task instruction, put before each text). llama.cpp loads
an adapter once per model and applies it per context (scale 1: alpha / rank, as PEFT scales it).

A request picks a task with `task` (jina's own field), a `prompt_name` equal to a task's name, or
an `input_type` (INPUT_TYPE_TASKS); none picks the model's default task if it names one, else the
base model with no adapter. A task's prompt_prefix takes the place of the model's prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import InvalidInput, InvalidModelFile
from daemon.gguf_info import read_gguf_facts
from daemon.prompts import INPUT_TYPE_PROMPTS, MAX_PROMPT_CHARS, ModelPrompts, choose_prompt

MAX_TASK_NAME_CHARS = 128
# Cohere's and Voyage's input types (and the query/document sides), as jina-embeddings-v3's tasks.
INPUT_TYPE_TASKS = {
    "query": "retrieval.query",
    "search_query": "retrieval.query",
    "document": "retrieval.passage",
    "search_document": "retrieval.passage",
    "classification": "classification",
    "clustering": "separation",
}


@dataclass(frozen=True)
class AdapterHeader:
    """What an adapter GGUF's header says."""

    task: str
    architecture: str
    prompt_prefix: str  # "" when the header has none
    alpha: float  # adapter.lora.alpha; 0: none (llama.cpp then scales by 1)


def read_adapter_header(path: Path, task: str | None = None) -> AdapterHeader:
    """An adapter GGUF's header, checked as llama.cpp checks it (general.type adapter, adapter.type
    lora); `task` names its task where the header names none (and must match one it names)."""
    try:
        is_file = path.is_file()
    except OSError:  # a name the OS refuses (ENAMETOOLONG); a NUL byte makes is_file say False
        is_file = False
    if not is_file:
        raise InvalidModelFile(f"{str(path)[:200]}: no such adapter file")
    facts = read_gguf_facts(path)
    metadata = facts.metadata
    kind, adapter_type = metadata.get("general.type"), metadata.get("adapter.type")
    if kind != "adapter" or adapter_type != "lora":
        raise InvalidModelFile(
            f"{path.name} is not a LoRA adapter: general.type is {kind!r} and adapter.type {adapter_type!r}"
            " (an adapter has 'adapter' and 'lora')"
        )
    named = metadata.get("adapter.lora.task_name")
    named = named if isinstance(named, str) and named else None
    if task is not None and named is not None and task != named:
        raise InvalidModelFile(f"{path.name} is the adapter of task {named!r}, not {task!r}")
    chosen = task or named
    if chosen is None:
        raise InvalidModelFile(f"{path.name} names no task (adapter.lora.task_name): give it one, TASK=PATH")
    if len(chosen) > MAX_TASK_NAME_CHARS or not chosen.strip():
        raise InvalidModelFile(f"{path.name}: a task name of 1 to {MAX_TASK_NAME_CHARS} characters, got {chosen!r:.80}")
    prefix = metadata.get("adapter.lora.prompt_prefix")
    prefix = prefix if isinstance(prefix, str) else ""
    if len(prefix) > MAX_PROMPT_CHARS:
        raise InvalidModelFile(f"{path.name}: a prompt_prefix of more than {MAX_PROMPT_CHARS} characters")
    alpha = metadata.get("adapter.lora.alpha")
    return AdapterHeader(chosen, facts.architecture, prefix, float(alpha) if isinstance(alpha, (int, float)) else 0.0)


def check_adapters(headers: Sequence[AdapterHeader], labels: Sequence[str], architecture: str | None) -> None:
    """Adapters a model may carry together: one per task, each of the model's architecture (llama.cpp
    refuses another: "model arch and LoRA arch mismatch"); `architecture` None: not known yet."""
    seen: dict[str, str] = {}
    for header, label in zip(headers, labels, strict=True):
        if header.task in seen:
            raise InvalidModelFile(f"{seen[header.task]} and {label} are both adapters of task {header.task!r}")
        seen[header.task] = label
        if architecture is not None and header.architecture != architecture:
            raise InvalidModelFile(
                f"{label} is an adapter of a {header.architecture} model, and this model is {architecture}"
            )


@dataclass(frozen=True)
class InputPrefix:
    """What a request's inputs get: the task adapter (None: the base model) and the text before each."""

    task: str | None
    prefix: str


def choose_input_prefix(
    prompts: ModelPrompts,
    task_prefixes: Mapping[str, str],
    default_task: str | None,
    task: str | None = None,
    prompt_name: str | None = None,
    input_type: str | None = None,
) -> InputPrefix:
    """The adapter and prefix a request gets (see the module docstring): `task_prefixes` maps the
    model's tasks to their prompt prefixes."""
    tasks = ", ".join(sorted(task_prefixes)) or "none"
    if input_type is not None and input_type not in INPUT_TYPE_TASKS:
        raise InvalidInput(f"input_type must be one of {', '.join(INPUT_TYPE_TASKS)}, got {input_type!r}")
    if task is not None:
        if task not in task_prefixes:
            raise InvalidInput(f"unknown task {task!r}; this model's tasks: {tasks}")
        if prompt_name is not None and prompt_name != task:
            raise InvalidInput(f"task {task!r} and prompt_name {prompt_name!r}: name one")
        return InputPrefix(task, task_prefixes[task])
    if prompt_name is not None:
        if prompt_name in task_prefixes:
            return InputPrefix(prompt_name, task_prefixes[prompt_name])
        if task_prefixes and prompt_name not in prompts.prompts:
            known = ", ".join(sorted(prompts.prompts)) or "none"
            raise InvalidInput(
                f"unknown prompt_name {prompt_name!r}; this model's prompts: {known}; its tasks: {tasks}"
            )
        return InputPrefix(None, choose_prompt(prompts, prompt_name))
    if input_type is not None:
        mapped = INPUT_TYPE_TASKS[input_type]
        if mapped in task_prefixes:
            return InputPrefix(mapped, task_prefixes[mapped])
        if input_type not in INPUT_TYPE_PROMPTS:
            return InputPrefix(None, "")  # a task's input type, on a model without its adapter: the text as is
        return InputPrefix(None, choose_prompt(prompts, None, input_type))
    if default_task is not None and default_task in task_prefixes:
        return InputPrefix(default_task, task_prefixes[default_task])
    return InputPrefix(None, choose_prompt(prompts, None))
