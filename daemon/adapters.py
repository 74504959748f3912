"""Task adapters: LoRA GGUFs a model carries (jina-embeddings-v3's one per task), their headers
checked, and which one a request gets (pure).

llama.cpp's converter writes jina-embeddings-v3 as a `jina-bert-v3` GGUF and one adapter GGUF per
task (`lora-{task}-<name>.gguf`): `general.type = adapter`, `adapter.type = lora`, the task's LoRA
pairs as `<base tensor>.lora_a` / `.lora_b`, `adapter.lora.alpha`, `adapter.lora.task_name` and
`adapter.lora.prompt_prefix` (the model's task instruction, put before each text). llama.cpp loads
an adapter once per model and applies it per context (scale 1: alpha / rank, as PEFT scales it).
Its pairs are checked against the model's tensors as llama.cpp's load checks them and as its first
decode asserts (lora_pairs_refusal), so an adapter for another model is refused when it is stored,
not at the model's first load.

A request picks a task with `task` (jina's own field), a `prompt_name` equal to a task's name, or
an `input_type` (INPUT_TYPE_TASKS); none picks the model's default task if it names one, else the
base model with no adapter. A task's prompt_prefix takes the place of the model's prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon.errors import InvalidInput, InvalidModelFile
from daemon.gguf_info import read_gguf_header
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
    # Each tensor's dimensions in GGUF's order (ne[0] first), for lora_pairs_refusal.
    tensor_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def read_adapter_header(path: Path, task: str | None = None) -> AdapterHeader:
    """An adapter GGUF's header, checked as llama.cpp checks it (general.type adapter, adapter.type
    lora); `task` names its task where the header names none (and must match one it names)."""
    try:
        is_file = path.is_file()
    except OSError:  # a name the OS refuses (ENAMETOOLONG); a NUL byte makes is_file say False
        is_file = False
    if not is_file:
        raise InvalidModelFile(f"{str(path)[:200]}: no such adapter file")
    facts, tensor_shapes = read_gguf_header(path)
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
    return AdapterHeader(
        chosen,
        facts.architecture,
        prefix,
        float(alpha) if isinstance(alpha, (int, float)) else 0.0,
        tensor_shapes,
    )


def check_adapters(
    headers: Sequence[AdapterHeader],
    labels: Sequence[str],
    architecture: str | None,
    model_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Adapters a model may carry together: one per task, each of the model's architecture (llama.cpp
    refuses another: "model arch and LoRA arch mismatch") and, given the model's tensor shapes, with
    pairs that fit its tensors (lora_pairs_refusal); `architecture` None: not known yet."""
    seen: dict[str, str] = {}
    for header, label in zip(headers, labels, strict=True):
        if header.task in seen:
            raise InvalidModelFile(f"{seen[header.task]} and {label} are both adapters of task {header.task!r}")
        seen[header.task] = label
        if architecture is not None and header.architecture != architecture:
            raise InvalidModelFile(
                f"{label} is an adapter of a {header.architecture} model, and this model is {architecture}"
            )
        reason = lora_pairs_refusal(header.tensor_shapes, model_shapes) if model_shapes is not None else None
        if reason is not None:
            raise InvalidModelFile(f"{label} does not fit this model: {reason}")


def _ne(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """A tensor's dimensions as ggml's ne[0..3] (a missing one is 1)."""
    padded = (*shape, 1, 1, 1, 1)
    return padded[0], padded[1], padded[2], padded[3]


def _shown(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(size) for size in shape) + "]"


# What llama.cpp's ggml_mul_mat asserts as it builds the first decode's graph with an adapter it took.
_ABORTS = "llama.cpp takes it, then aborts at its first decode (GGML_ASSERT(ggml_can_mul_mat(a, b)))"


def lora_pairs_refusal(
    adapter_shapes: Mapping[str, Sequence[int]], model_shapes: Mapping[str, Sequence[int]]
) -> str | None:
    """Why llama.cpp refuses an adapter's tensors on a model, or aborts on them, or None when it
    takes them. Shapes are in GGUF's order (ne[0] first). Its load's rule (llama_adapter_lora_init_impl,
    src/llama-adapter.cpp), in its order: each tensor is `<base>.lora_a` or `.lora_b` (`*_norm.weight`
    ones are skipped); then, by base name: both halves present, the base a tensor of the model, and
    lora_a [n_in, rank], lora_b [rank, n_out] for a model tensor [n_in, n_out] (token_embd: lora_a
    [rank, n_out] and lora_b [rank, n_in], the pair flipped, ranks not compared). Then what its
    first decode's graph asserts (ggml_mul_mat) of a pair it took: token_embd's two ranks the same,
    and a pair for a two-dimensional tensor two-dimensional itself."""
    pairs: dict[str, dict[str, Sequence[int]]] = {}
    for name, shape in adapter_shapes.items():
        if name.endswith(".lora_a"):
            pairs.setdefault(name.replace(".lora_a", ""), {})["lora_a"] = shape
        elif name.endswith(".lora_b"):
            pairs.setdefault(name.replace(".lora_b", ""), {})["lora_b"] = shape
        elif not name.endswith("_norm.weight"):
            return f"LoRA tensor '{name}' has unexpected suffix (a LoRA tensor is <tensor>.lora_a or .lora_b)"
    for base in sorted(pairs):  # llama.cpp's std::map order: the first refusal it would meet
        halves = pairs[base]
        if "lora_a" not in halves or "lora_b" not in halves:
            lacking = "lora_b" if "lora_a" in halves else "lora_a"
            return f"LoRA tensor pair for '{base}' is missing one component (its {lacking})"
        if base not in model_shapes:
            return f"LoRA tensor '{base}' does not exist in base model"
        a, b, model = halves["lora_a"], halves["lora_b"], model_shapes[base]
        (a0, a1, *a_rest), (b0, b1, *b_rest), (m0, m1, *m_rest) = _ne(a), _ne(b), _ne(model)
        shapes = f"lora_a is {_shown(a)} and lora_b {_shown(b)}, for the model's {_shown(model)}"
        token_embd = base.endswith("token_embd.weight")
        if token_embd:  # applied to the embedding's rows: the pair is flipped
            fits, wanted = (m0, m1) == (b1, a1), f"lora_a [rank, {m1}] and lora_b [rank, {m0}]"
        else:
            fits, wanted = (m0, m1) == (a0, b1), f"lora_a [{m0}, rank] and lora_b [rank, {m1}]"
        if not fits:
            return f"tensor '{base}' has incorrect shape: {shapes}; llama.cpp takes {wanted}"
        if not token_embd and a1 != b0:
            return f"tensor '{base}': lora_a tensor is not transposed: {shapes}, and their ranks differ ({a1}, {b0})"
        if token_embd and a0 != b0:
            return f"tensor '{base}': {shapes}, and their ranks differ ({a0}, {b0}); {_ABORTS}"
        if m_rest == [1, 1] and (a_rest != [1, 1] or b_rest != [1, 1]):
            return f"tensor '{base}': {shapes}, a pair of more than two dimensions for a matrix; {_ABORTS}"
    return None


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
