"""Training and validation data: the openr1 parquet schema, validation JSON files, tokenisation, order.

Training files (parquet, hpt.md section 3; the published ``openr1.parquet`` has exactly this form):

| column | type | read as |
|---|---|---|
| ``prompt`` | list<struct<role: string, content: string>> | the chat messages (required; roles system, user, assistant, tool; the last a non-blank user message) |
| ``target`` | list<struct<role, content>> or string | the demonstration: the content of the one assistant message, or the string; null: none |
| ``reward_model`` | struct<ground_truth: string, ...> | the answer the reward checks (required) |
| ``data_source`` | string | for per-source metrics (optional, default "") |
| ``ability``, ``extra_info`` | string, struct<split: string, index: int64> | written, not needed to read |

``target`` is required when the method trains on demonstrations (``require_target``); a null
target on a row means that prompt has no demonstration (the HPT gate then keeps it on RL). A
target given as messages must hold exactly one assistant message (other roles are refused, so a
whole conversation is not read as its first turn). Targets and ground truths that are empty or
blank are refused, and a column written as all-null (Arrow type ``null``, as pandas writes an
empty optional column) reads as absent values; a method that trains on demonstrations refuses a
file with none.

Validation files (JSON): a list of objects, one per problem, with exactly one of
``"prompt"`` (a string: the user message, or a list of ``{role, content}`` messages) or
``"problem"`` (a string), and ``"answer"`` (a non-blank string, or a finite number, read as its
plain decimal string: ``1e-05`` as ``"0.00001"``, ``3.0`` as ``"3"``).
Other keys are ignored. A set is named after the file: its parent directory for a file named
``test.json`` (``data/AIME24/test.json`` -> "AIME24"), else the file's stem.

Tokenisation (``PromptSet``): a prompt is rendered by the tokenizer's chat template with the
generation prompt (``apply_chat_template(..., add_generation_prompt=True)``) and encoded without
adding special tokens (the template writes them), or, with a ``prompt_template`` such as
``"Question:\\n{prompt}\\nAnswer:"``, by replacing its ``{prompt}`` with the last message's
content, encoded with the tokenizer's special tokens (a base model's BOS), unless the template
itself starts with the tokenizer's BOS text (one BOS either way). ``prompt_suffix`` is
appended to every user message first. Prompts longer than ``max_prompt_length`` tokens, or
than the model's context less one, are dropped, and the count is logged. Demonstrations are encoded when a batch asks for them, truncated to
``max_response_length - 1`` tokens, or to what the model's context leaves after the prompt less
one, and ended with EOS (truncations counted), so a demonstration row is never longer than a
rollout could be; a leading
``<think>\\n`` is dropped when the prompt already ends with one (R1-style templates).

Order (``PromptSampler``): each epoch is a permutation of the prompts drawn from (seed, epoch)
alone, so a run resumed at position (epoch, index) sees exactly the prompts it would have seen.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hpt_fast.reward import extract_boxed

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
_THINK = "<think>\n"

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
# the schema ``write_train_parquet`` writes (that of the published openr1.parquet)
TRAIN_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(MESSAGE)),
    ("target", pa.list_(MESSAGE)),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
])


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and column or item)."""


@dataclass(frozen=True)
class Problem:
    """One prompt with its answer and, for training, its demonstration.

    Attributes:
        prompt: chat messages, each {"role": str, "content": str}.
        ground_truth: the answer string the reward checks against.
        target: the demonstration (a reasoning trace starting with ``<think>``), or None.
        data_source: where the problem comes from (per-source metrics).
        index: its position in the file it was read from.
    """

    prompt: list[dict[str, str]]
    ground_truth: str
    target: Optional[str] = None
    data_source: str = ""
    index: int = 0


# ---- parquet -----------------------------------------------------------------------------------


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):  # dictionary-encoded, as pandas writes a categorical column
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_messages(t: pa.DataType) -> bool:
    """list<struct<role: string, content: string, ...>>."""
    if not _is_list(t) or not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return all(k in fields and _is_string(fields[k]) for k in ("role", "content"))


def _column(table: pa.Table, path: Path, name: str, ok, expected: str) -> Optional[list]:
    """Column ``name`` as Python values after checking its type; None if the table lacks it."""
    if name not in table.column_names:
        return None
    t = table.schema.field(name).type
    if not (ok(t) or pa.types.is_null(t)):
        raise DataError(f"{path}: column {name!r} must be {expected}, got {t}")
    return table.column(name).to_pylist()


def _messages(where: str, value) -> list[dict[str, str]]:
    """A non-empty list of {role, content} string messages, or DataError starting with ``where``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of messages, got {value!r:.80}")
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: each message needs string 'role' and 'content', got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# the roles chat templates know; any other (a typo such as "usr") most templates render silently
PROMPT_ROLES = ("system", "user", "assistant", "tool")


def _prompt_messages(where: str, value) -> list[dict[str, str]]:
    """``_messages`` for a prompt: every role one of ``PROMPT_ROLES``, and the last message a
    non-blank user turn, which the generation prompt answers (and which a ``prompt_template``
    takes)."""
    messages = _messages(where, value)
    unknown = sorted({m["role"] for m in messages} - set(PROMPT_ROLES))
    if unknown:
        raise DataError(f"{where}: unknown message role(s) {unknown}; a prompt's roles are {list(PROMPT_ROLES)}")
    last = messages[-1]
    if last["role"] != "user":
        raise DataError(f"{where}: a prompt must end with a user message (the model answers it), ends with {last['role']!r}")
    if not last["content"].strip():
        raise DataError(f"{where}: the last user message is blank")
    return messages


def _demonstration(where: str, value: Union[str, list]) -> str:
    """A target's text: the string, or the content of the one assistant message of a list."""
    if isinstance(value, list):
        messages = _messages(where, value)
        roles = [m["role"] for m in messages]
        if roles != ["assistant"]:
            raise DataError(f"{where}: a demonstration given as messages must be one assistant message, got roles {roles}")
        value = messages[0]["content"]
    if not value.strip():
        raise DataError(f"{where}: blank demonstration {value!r} (write null for a prompt without one)")
    return value


# a \boxed that is not the start of a longer macro name (\boxedfoo is no box)
_BOX = re.compile(r"\\boxed(?![A-Za-z])")


def _check_ground_truth(where: str, truth: str) -> None:
    """DataError for a ground truth no response can match: blank, or a ``\\boxed`` with nothing in
    it (empty, or never closed), which the reward reads as no answer."""
    if not truth.strip():
        raise DataError(f"{where}: blank {truth!r}")
    if _BOX.search(truth) and extract_boxed(truth) is None:
        raise DataError(f"{where}: {truth!r:.80} has an empty or unclosed \\boxed: no answer could match it")


def read_train_parquet(path: PathLike, require_target: bool = True) -> list[Problem]:
    """The problems of an openr1-schema parquet file (schema in the module docstring).

    Raises DataError naming the file and column for a missing column, a wrong type, a null where
    a value is required, or a file with no rows.
    """
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read as parquet: {err}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    for name in ("prompt", "reward_model") + (("target",) if require_target else ()):
        if name not in table.column_names:
            raise DataError(f"{path}: missing column {name!r} (columns: {', '.join(table.column_names)})")
    prompts = _column(table, path, "prompt", _is_messages, "a list of {role, content} messages")
    rm_type = table.schema.field("reward_model").type
    if not (pa.types.is_struct(rm_type) and rm_type.get_field_index("ground_truth") >= 0
            and _is_string(rm_type.field("ground_truth").type)):
        raise DataError(f"{path}: column 'reward_model' must be a struct with a string 'ground_truth', got {rm_type}")
    truths = [None if rm is None else rm["ground_truth"] for rm in table.column("reward_model").to_pylist()]
    targets = _column(
        table, path, "target", lambda t: _is_string(t) or _is_messages(t),
        "a string or a list of {role, content} messages",
    )
    sources = _column(table, path, "data_source", _is_string, "a string")
    out = []
    for i, (prompt, truth) in enumerate(zip(prompts, truths)):
        if truth is None:
            raise DataError(f"{path}: column 'reward_model', row {i}: null (or null ground_truth)")
        _check_ground_truth(f"{path}: column 'reward_model', row {i}: ground_truth", truth)
        target = None if targets is None else targets[i]
        if target is not None:
            target = _demonstration(f"{path}: column 'target', row {i}", target)
        out.append(Problem(
            prompt=_prompt_messages(f"{path}: column 'prompt', row {i}", prompt),
            ground_truth=truth,
            target=target,
            data_source="" if sources is None else (sources[i] or ""),
            index=i,
        ))
    if require_target and all(p.target is None for p in out):
        raise DataError(f"{path}: column 'target' holds no demonstration (null on every row); the method trains on them")
    return out


def write_train_parquet(path: PathLike, problems: Sequence[Problem], split: str = "train") -> None:
    """Write ``problems`` in the openr1 schema (``TRAIN_SCHEMA``); targets as one assistant message."""
    rows = {
        "data_source": [p.data_source for p in problems],
        "prompt": [p.prompt for p in problems],
        "target": [None if p.target is None else [{"role": "assistant", "content": p.target}] for p in problems],
        "ability": ["math"] * len(problems),
        "reward_model": [{"ground_truth": p.ground_truth, "style": "rule"} for p in problems],
        "extra_info": [{"split": split, "index": p.index} for p in problems],
    }
    pq.write_table(pa.Table.from_pydict(rows, schema=TRAIN_SCHEMA), Path(path))


# ---- validation JSON ---------------------------------------------------------------------------


def _json_item(path: Path, i: int, item: Any) -> Problem:
    where = f"{path}: item {i}"
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with 'prompt' or 'problem' and 'answer', got {type(item).__name__}")
    keys = [k for k in ("prompt", "problem") if k in item]
    if len(keys) != 1:
        raise DataError(f"{where}: needs exactly one of 'prompt' and 'problem', has {keys or 'neither'}")
    question = item[keys[0]]
    if isinstance(question, str) and question.strip():
        messages = [{"role": "user", "content": question}]
    elif keys[0] == "prompt" and isinstance(question, list):
        messages = _prompt_messages(f"{where}, key 'prompt'", question)
    else:
        raise DataError(f"{where}: {keys[0]!r} must be a non-blank string{' or a list of messages' if keys[0] == 'prompt' else ''}")
    if "answer" not in item:
        raise DataError(f"{where}: missing key 'answer'")
    answer = item["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
    if isinstance(answer, float):
        if not math.isfinite(answer):
            raise DataError(f"{where}: 'answer' must be finite, got {answer}")
        # str() would give "1e-05" / "1e+21", which no response writes; repr is the shortest
        # decimal that reads back as the same float
        answer = format(Decimal(repr(answer)).normalize(), "f")
    answer = str(answer)
    _check_ground_truth(f"{where}: 'answer'", answer)
    return Problem(prompt=messages, ground_truth=answer, data_source=validation_name(path), index=i)


def read_validation_json(path: PathLike) -> list[Problem]:
    """The problems of a validation JSON file (format in the module docstring)."""
    path = Path(path)
    try:
        # utf-8-sig: the byte-order mark some Windows tools write is not JSON
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); JSON files are UTF-8") from None
    except json.JSONDecodeError as err:
        hint = " (one object per line is JSON Lines: write one JSON list)" if err.msg == "Extra data" else ""
        raise DataError(f"{path}: not valid JSON: {err}{hint}") from None
    except ValueError as err:  # e.g. an integer over Python's digit limit
        raise DataError(f"{path}: {err}") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of problems, got {type(items).__name__}")
    if not items:
        raise DataError(f"{path}: no problems")
    return [_json_item(path, i, item) for i, item in enumerate(items)]


def write_validation_json(path: PathLike, problems: Sequence[Problem]) -> None:
    """Write ``problems`` as a validation file: {"prompt": messages or the user text, "answer"}."""
    items = [
        {"prompt": p.prompt[0]["content"] if len(p.prompt) == 1 and p.prompt[0]["role"] == "user" else p.prompt,
         "answer": p.ground_truth}
        for p in problems
    ]
    Path(path).write_text(json.dumps(items, indent=1, ensure_ascii=False))


def validation_name(path: PathLike) -> str:
    """The benchmark name of a validation file (see the module docstring)."""
    path = Path(path)
    return path.parent.name if path.name == "test.json" and path.parent.name else path.stem


def check_set_names(paths: Sequence[PathLike]) -> None:
    """DataError when two validation files would report under one benchmark name (``validation_name``)."""
    by_name: dict[str, list[str]] = {}
    for path in paths:
        by_name.setdefault(validation_name(path), []).append(str(path))
    for name, clashing in by_name.items():
        if len(clashing) > 1:
            raise DataError(f"benchmark name {name!r} is shared by {', '.join(clashing)}; rename one")


def read_problems(path: PathLike, require_target: bool = False) -> list[Problem]:
    """Problems of a ``.parquet`` training file or a ``.json`` validation file."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    suffix = Path(path).suffix
    if suffix == ".parquet":
        return read_train_parquet(path, require_target)
    if suffix == ".json":
        if require_target:
            raise DataError(f"{path}: validation JSON files have no demonstrations; training needs a parquet file")
        return read_validation_json(path)
    raise DataError(f"{path}: unknown data file type {suffix!r}; expected .parquet (training) or .json (validation)")


# ---- tokenisation ------------------------------------------------------------------------------


def render_prompt(tokenizer, messages: list[dict[str, str]], template: Optional[str] = None, suffix: str = "") -> str:
    """The prompt text the model sees (rules in the module docstring)."""
    if suffix:
        messages = [dict(m, content=m["content"] + suffix) if m["role"] == "user" else m for m in messages]
    if template is not None:
        # replace, not str.format: a template may hold other braces (\boxed{}, say)
        return template.replace("{prompt}", messages[-1]["content"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template; set data.prompt_template (hpt_fast.eval: --prompt-template), "
            "e.g. 'Question:\\n{prompt}\\nAnswer:'"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _render(tokenizer, problem: Problem, template: Optional[str], suffix: str, name: str) -> str:
    """``render_prompt``, with a chat template's own refusal (Gemma's of a system turn, say) as a
    DataError naming the problem."""
    from jinja2.exceptions import TemplateError

    try:
        return render_prompt(tokenizer, problem.prompt, template, suffix)
    except TemplateError as err:
        raise DataError(f"{name}: problem {problem.index}: the chat template refused its messages: {err}") from None


class Ragged:
    """Variable-length int32 rows in one flat buffer: ``values`` [total], ``offsets`` int64 [N + 1]."""

    def __init__(self, rows: Sequence[Sequence[int]]) -> None:
        arrays = [np.asarray(r, dtype=np.int32) for r in rows]
        self.offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=self.offsets[1:])
        self.values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """int64 [N], the rows' lengths."""
        return np.diff(self.offsets)


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one batch, tokenized.

    Attributes:
        indices: [B] positions in the PromptSet.
        prompt_ids: B lists of token ids, each at most max_prompt_length long.
        demo_ids: B lists of demonstration token ids (at most max_response_length, ending with
            EOS), or None where the prompt has no demonstration.
        ground_truths: [B] answer strings.
        data_sources: [B].
    """

    indices: list[int]
    prompt_ids: list[list[int]]
    demo_ids: list[Optional[list[int]]]
    ground_truths: list[str]
    data_sources: list[str]

    @property
    def has_demo(self) -> list[bool]:
        return [d is not None for d in self.demo_ids]


def _adds_special_tokens(tokenizer, template: Optional[str]) -> bool:
    """Whether prompts rendered with ``template`` are encoded with the tokenizer's special tokens:
    only a plain template's, and not one that writes the BOS text itself (a chat template, or a
    ``prompt_template`` starting with it), which would give two BOS, the first a token the model
    never saw there in pretraining."""
    bos = getattr(tokenizer, "bos_token", None)
    return template is not None and not (bos and template.startswith(bos))


class PromptSet:
    """Problems with their prompts tokenized (over-long ones dropped) and demonstrations on demand.

    Args:
        problems: the problems, e.g. ``read_problems(path)``.
        tokenizer: a transformers tokenizer (chat template, EOS).
        max_prompt_length: prompts longer than this many tokens are dropped (count in ``dropped``).
        max_response_length: demonstrations are cut to this many tokens, EOS included.
        template, suffix: ``data.prompt_template`` and ``data.prompt_suffix``.
        name: for log messages (a file name or a benchmark name).
        max_context: the model's context length, or None: prompts that leave no room in it for a
            token are dropped too (the engines refuse them), and a demonstration is cut to the
            room its prompt leaves (EOS included), as a rollout stops there.

    Attributes:
        prompts: Ragged int32, the kept prompts' token ids.
        prompt_texts: the kept prompts as rendered text.
        problems: the kept problems.
        dropped: how many prompts were too long.
        demos_truncated: how many demonstrations ``batch`` has truncated so far.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        tokenizer,
        max_prompt_length: int,
        max_response_length: int,
        template: Optional[str] = None,
        suffix: str = "",
        name: str = "",
        max_context: Optional[int] = None,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token: demonstrations must end with one")
        self.tokenizer = tokenizer
        self.max_response_length = max_response_length
        self.max_context = max_context
        self.name = name
        if not problems:
            raise DataError(f"{name}: no problems")
        texts = [_render(tokenizer, p, template, suffix, name) for p in problems]
        special = _adds_special_tokens(tokenizer, template)
        ids = tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []
        limit, why = max_prompt_length, f"max_prompt_length = {max_prompt_length} tokens"
        if max_context is not None and max_context - 1 < limit:
            limit, why = max_context - 1, f"{max_context - 1} tokens (the model's context of {max_context} less one)"
        keep = [i for i, row in enumerate(ids) if len(row) <= limit]
        self.dropped = len(problems) - len(keep)
        if self.dropped:
            logger.warning("%s: dropped %d of %d prompts longer than %s", name, self.dropped, len(problems), why)
        if not keep:
            raise DataError(f"{name}: every prompt is longer than {why}")
        self.problems = [problems[i] for i in keep]
        self.prompt_texts = [texts[i] for i in keep]
        self.prompts = Ragged([ids[i] for i in keep])
        self.demos_truncated = 0

    def __len__(self) -> int:
        return len(self.problems)

    def batch(self, indices: Sequence[int]) -> PromptBatch:
        """The prompts ``indices`` with their demonstrations tokenized (see the class docstring)."""
        indices = [int(i) for i in indices]
        problems = [self.problems[i] for i in indices]
        with_demo = [k for k, p in enumerate(problems) if p.target is not None]
        demo_ids: list[Optional[list[int]]] = [None] * len(indices)
        if with_demo:
            texts = []
            for k in with_demo:
                target = problems[k].target
                if self.prompt_texts[indices[k]].endswith(_THINK) and target.startswith(_THINK):
                    target = target[len(_THINK):]
                texts.append(target)
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            for k, ids in zip(with_demo, encoded):
                # past the model's context a RoPE model would train on positions it never saw (and
                # one with learned positions fail); the kept prompts leave room for EOS at least
                room = self.max_response_length
                if self.max_context is not None:
                    room = min(room, self.max_context - len(self.prompts[indices[k]]))
                limit = room - 1
                if len(ids) > limit:
                    self.demos_truncated += 1
                demo_ids[k] = list(ids[:limit]) + [self.tokenizer.eos_token_id]
        return PromptBatch(
            indices=indices,
            prompt_ids=[self.prompts[i].tolist() for i in indices],
            demo_ids=demo_ids,
            ground_truths=[p.ground_truth for p in problems],
            data_sources=[p.data_source for p in problems],
        )


def load_prompt_set(
    paths: Union[PathLike, Sequence[PathLike]],
    tokenizer,
    max_prompt_length: int,
    max_response_length: int,
    template: Optional[str] = None,
    suffix: str = "",
    require_target: bool = False,
    max_context: Optional[int] = None,
) -> PromptSet:
    """Read one or more data files (``read_problems``), concatenated, into a PromptSet
    (``max_context``: as there).

    The set is named after the file (``validation_name``) when there is one, else "train".
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DataError("no data files given")
    problems = [p for path in paths for p in read_problems(path, require_target)]
    name = validation_name(paths[0]) if len(paths) == 1 else "train"
    return PromptSet(problems, tokenizer, max_prompt_length, max_response_length, template, suffix, name, max_context)


# ---- order -------------------------------------------------------------------------------------


class PromptSampler:
    """Batches of prompt indices in a deterministic order that can resume from a checkpoint.

    Epoch e visits ``permutation(size)`` drawn from numpy's generator seeded with (seed, e) (or
    0 .. size - 1 without shuffling). With shuffling a batch never spans two epochs (it could hold
    a prompt twice): the last ``size % batch_size`` prompts of an epoch's order are skipped,
    different ones each epoch. In file order a batch runs on into the next epoch instead, so that
    every prompt takes its turn.

    Attributes:
        epoch, index: the position of the next batch: epoch and offset into its order.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    def order(self, epoch: int) -> np.ndarray:
        """int64 [size], the visiting order of ``epoch``."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
            self._order_epoch = epoch
        return self._order

    def next_batch(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` prompt indices; advances the position."""
        if not 1 <= batch_size <= self.size:
            raise ValueError(f"batch_size must be in [1, {self.size}] (the number of prompts), got {batch_size}")
        if self.shuffle and self.index + batch_size > self.size:
            self.epoch, self.index = self.epoch + 1, 0
        batch: list[int] = []
        while len(batch) < batch_size:
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
            part = self.order(self.epoch)[self.index : self.index + batch_size - len(batch)]
            batch += part.tolist()
            self.index += len(part)
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position, for a checkpoint: {"epoch", "index"}."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position from ``state_dict``."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.size:
            raise ValueError(f"bad sampler position epoch={epoch}, index={index} for {self.size} prompts")
        self.epoch, self.index = epoch, index


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch; the batch must split evenly."""
    if len(indices) % world_size:
        raise ValueError(f"a batch of {len(indices)} prompts does not split evenly over {world_size} ranks")
    per = len(indices) // world_size
    return list(indices[rank * per : (rank + 1) * per])
