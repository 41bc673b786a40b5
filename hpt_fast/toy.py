"""The embedded default: a synthetic arithmetic task, a character-level tokenizer and a tiny Qwen2
warmed up on the easiest problems, so that ``python -m hpt_fast.train`` needs no download.

The task, in the openr1 schema (hpt_fast.data), by difficulty:

| level | name | problem | worked demonstration (between ``<think>\\n`` and ``</think>\\n\\boxed{answer}``) |
|---|---|---|---|
| 1 | add1 | a + b, single digits | ``a+b=s`` |
| 2 | add3 | a + b + c, digits with a + b <= 9 | ``a+b=s``, ``s+c=t`` |
| 3 | add4 | a + b + c + d, digits with a + b + c <= 9 | three such lines |
| 4 | add2digit | x + y, two-digit numbers | units, tens, carry, ``x+y=t`` |

Every step of levels 2 and 3 is a level-1 fact (the running sums stay single digits until the
last term), so a model that knows level 1 only has to learn the chaining from the demonstrations;
level 4 also needs new facts (tens sums up to 19) and digit assembly.

A problem statement is an expression in one of six phrasings (``What is 3+4?``, ``Compute 3 + 4.``,
...), with or without spaces around the operators, as a single user message. Each level's
statements are shuffled by the seed; the first ``val_per_level`` are held out as that level's
validation file (``toy-add1.json``, ...), the next ``train_per_level`` go to the training file.
Held out means unseen statements: for level 1 every sum also appears in training, phrased
differently (there are only 100 of them); at the higher levels most held-out operand tuples are new.

The tokenizer has one token per byte (so per ASCII character), plus ``<pad>``, ``<unk>``,
``<bos>`` and the chat markers ``<|im_start|>`` / ``<|im_end|>`` (EOS), and a Qwen-style chat
template; it is saved with the model, and ``AutoTokenizer`` loads it back unchanged.

The model is a Qwen2 with ``ToySpec``'s shape, trained by plain AdamW on the level-1 training
problems (loss on the demonstration tokens) for ``warmup_steps`` steps, so that most easy rollouts
succeed and harder ones mostly fail: the situation HPT's gate is made for. Measured on the default
build: greedy held-out accuracy 1.0 on add1 and 0.03 / 0 / 0 on the other levels; at temperature
1 the add1 rollouts are 85% correct (a third of the prompts all-correct), add3 3%, add2digit 0%.

``build_toy(dir, seed)`` writes everything under ``dir/<content hash>/`` and returns the paths; the
hash covers the seed, the spec, this module's and hpt_fast.data's source and the torch and
transformers versions, so a second call with the same inputs returns at once.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from hpt_fast import data as data_mod
from hpt_fast.config import TOY, Config, ConfigError, OptimConfig
from hpt_fast.data import Problem, PromptSet
from hpt_fast.reward import RewardPool

PAD, UNK, BOS, IM_START, IM_END = "<pad>", "<unk>", "<bos>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PHRASINGS = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "Evaluate {e}.", "{e} = ?", "Find {e}.")
MANIFEST = "toy.json"


# ---- the task ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One difficulty level: its operand tuples and how a tuple becomes a problem."""

    name: str
    operands: Callable[[], list[tuple[int, ...]]]
    # operands -> (expression tokens, answer, worked lines)
    solve: Callable[..., tuple[list[str], int, list[str]]]


def _chain(*terms: int):
    """A sum worked left to right, one addition per line."""
    lines, total = [], terms[0]
    for t in terms[1:]:
        lines.append(f"{total}+{t}={total + t}")
        total += t
    return [tok for t in terms for tok in ("+", str(t))][1:], total, lines


def _add2digit(x: int, y: int):
    xt, xu, yt, yu = x // 10, x % 10, y // 10, y % 10
    carry = (xu + yu) // 10
    lines = [f"{xu}+{yu}={xu + yu}", f"{xt}+{yt}={xt + yt}", f"{xt + yt}+{carry}={xt + yt + carry}", f"{x}+{y}={x + y}"]
    return [str(x), "+", str(y)], x + y, lines


DIGITS = range(10)
TWO_DIGITS = range(10, 100)


def _digits(n: int, max_partial: int) -> Callable[[], list[tuple[int, ...]]]:
    """n-tuples of digits whose running sums before the last term stay at most ``max_partial``."""
    def tuples():
        return [t for t in itertools.product(DIGITS, repeat=n) if all(sum(t[:k]) <= max_partial for k in range(2, n))]
    return tuples


LEVELS: dict[int, Level] = {
    1: Level("add1", _digits(2, 9), _chain),
    2: Level("add3", _digits(3, 9), _chain),
    3: Level("add4", _digits(4, 9), _chain),
    4: Level("add2digit", lambda: list(itertools.product(TWO_DIGITS, TWO_DIGITS)), _add2digit),
}


def demonstration(lines: Sequence[str], answer: int) -> str:
    """A worked solution: ``<think>`` with one step per line, then the boxed answer."""
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n\\boxed{{{answer}}}"


def level_problems(level: int, seed: int) -> list[Problem]:
    """Every problem statement of ``level``, in the seed's shuffled order.

    Returns:
        Problems with a user prompt, the answer as ground truth, the worked demonstration as
        target and data_source "toy-<name>".
    """
    spec = LEVELS[level]
    out = []
    for ops in spec.operands():
        tokens, answer, lines = spec.solve(*ops)
        target = demonstration(lines, answer)
        for phrasing, joiner in itertools.product(PHRASINGS, ("", " ")):
            out.append(Problem(
                prompt=[{"role": "user", "content": phrasing.format(e=joiner.join(tokens))}],
                ground_truth=str(answer), target=target, data_source=f"toy-{spec.name}",
            ))
    order = np.random.default_rng([seed, level]).permutation(len(out))
    return [out[i] for i in order]


def split_problems(seed: int, train_per_level: int, val_per_level: int) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """The training problems (all levels) and the held-out validation problems per level name."""
    train, val = [], {}
    for level, spec in LEVELS.items():
        problems = level_problems(level, seed)
        if val_per_level + train_per_level > len(problems):
            raise ValueError(f"level {spec.name} has {len(problems)} problems, fewer than {val_per_level} + {train_per_level}")
        val[f"toy-{spec.name}"] = [dataclasses.replace(p, target=None, index=i) for i, p in enumerate(problems[:val_per_level])]
        train += problems[val_per_level : val_per_level + train_per_level]
    return [dataclasses.replace(p, index=i) for i, p in enumerate(train)], val


# ---- tokenizer and model -----------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's map), in byte order: printable
    Latin-1 bytes stand for themselves, the others for the code points from 256 up."""
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    shifted = iter(range(256, 512))
    return [chr(b) if b in visible else chr(next(shifted)) for b in range(256)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer (see the module docstring), built with ``tokenizers``.

    It is a byte-level BPE without merges: one token per byte, so one per ASCII character. Being
    byte-level as Qwen's own tokenizers are, it reads the same when ``AutoTokenizer`` loads it from
    the model directory as a ``Qwen2Tokenizer`` (which keeps the BPE model and the added tokens
    but installs Qwen's byte-level pre-tokenizer and decoder).
    """
    specials = [PAD, UNK, BOS, IM_START, IM_END]
    vocab = {tok: i for i, tok in enumerate(specials + _byte_symbols())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=IM_END, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[IM_START],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@dataclass(frozen=True)
class ToySpec:
    """Sizes of the toy task, model and warm-up (all part of the cache key).

    Attributes:
        train_per_level, val_per_level: problems per level in the training file and held out.
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: the Qwen2 shape.
        warmup_steps, warmup_batch, warmup_lr: the level-1 SFT warm-up (AdamW, 10% linear
            warm-up then cosine to 10% of the peak).
        max_length: the model's maximum positions (prompt + response).
    """

    train_per_level: int = 800
    val_per_level: int = 64
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    warmup_steps: int = 300
    warmup_batch: int = 32
    warmup_lr: float = 3e-3
    max_length: int = 256


def build_model(tokenizer: PreTrainedTokenizerFast, spec: ToySpec) -> Qwen2ForCausalLM:
    """A freshly initialised float32 Qwen2 of ``spec``'s shape over ``tokenizer``'s vocabulary."""
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_length,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _sft_tensors(prompts: PromptSet, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every prompt + demonstration of ``prompts``, right-padded.

    Returns:
        input_ids int64 [N, T], attention_mask int64 [N, T], labels int64 [N, T] (-100 except on
        the demonstration tokens, which the model learns to predict).
    """
    batch = prompts.batch(range(len(prompts)))
    seqs = [p + d for p, d in zip(batch.prompt_ids, batch.demo_ids)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (p, s) in enumerate(zip(batch.prompt_ids, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
    return ids, (ids != pad_id).long(), labels


@contextlib.contextmanager
def _one_thread():
    """Run torch ops on one thread (a context manager or decorator).

    The toy's tensors are too small for a second thread to help, and on a busy 2-core machine
    OpenMP's spin-waiting made a warm-up step 5-10x slower with two threads (measured: 46 ms vs
    358 ms per step while another process kept both cores busy).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@_one_thread()
def warm_up(model: Qwen2ForCausalLM, prompts: PromptSet, spec: ToySpec, seed: int) -> list[float]:
    """SFT ``model`` on ``prompts``' demonstrations (random batches); returns the loss per step."""
    ids, mask, labels = _sft_tensors(prompts, prompts.tokenizer.pad_token_id)
    schedule = OptimConfig(lr=spec.warmup_lr, schedule="cosine", warmup_steps=max(spec.warmup_steps // 10, 1), min_lr_ratio=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.warmup_lr, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(spec.warmup_steps):
        rows = torch.randint(len(ids), (spec.warmup_batch,), generator=gen)
        length = int(mask[rows].sum(1).max())  # drop the columns that are padding in every row
        for group in opt.param_groups:
            group["lr"] = spec.warmup_lr * schedule.lr_factor(step, spec.warmup_steps)
        out = model(input_ids=ids[rows, :length], attention_mask=mask[rows, :length], labels=labels[rows, :length])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


@torch.no_grad()
@_one_thread()
def greedy_accuracy(
    model, tokenizer, problems: Sequence[Problem], max_new_tokens: int = 64, batch_size: int = 64
) -> float:
    """Fraction of ``problems`` whose greedy completion earns reward 1 (hpt_fast.reward)."""
    prompts = PromptSet(problems, tokenizer, max_prompt_length=10**6, max_response_length=max_new_tokens, name="greedy")
    responses = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts.prompt_texts[start : start + batch_size], add_special_tokens=False,
                        return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        responses += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    with RewardPool(num_workers=1) as pool:
        scores = pool.score(responses, [p.ground_truth for p in prompts.problems])
    return float(scores.rewards.mean())


# ---- the build and its cache -------------------------------------------------------------------


@dataclass(frozen=True)
class ToyPaths:
    """Where a toy build lives.

    Attributes:
        root: the build directory; model: the model and tokenizer directory (save_pretrained);
        train: the openr1-schema parquet file; validation: benchmark name -> validation JSON file.
    """

    root: Path
    model: Path
    train: Path
    validation: dict[str, Path]


def default_toy_dir() -> Path:
    """$XDG_CACHE_HOME/hpt_fast/toy, or ~/.cache/hpt_fast/toy."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpt_fast" / "toy"


def content_hash(seed: int, spec: ToySpec) -> str:
    """The cache key of a build (see the module docstring)."""
    sources = [Path(__file__).read_bytes(), Path(data_mod.__file__).read_bytes()]
    h = hashlib.sha256()
    h.update(json.dumps({"seed": seed, "spec": dataclasses.asdict(spec), "torch": torch.__version__,
                         "transformers": transformers.__version__}, sort_keys=True).encode())
    for src in sources:
        h.update(hashlib.sha256(src).digest())
    return h.hexdigest()[:16]


def _paths(root: Path) -> ToyPaths:
    manifest = json.loads((root / MANIFEST).read_text())
    return ToyPaths(
        root=root, model=root / manifest["model"], train=root / manifest["train"],
        validation={name: root / rel for name, rel in manifest["validation"].items()},
    )


def _build(out: Path, seed: int, spec: ToySpec) -> None:
    """Write a complete build into the empty directory ``out``."""
    start = time.perf_counter()
    train, val = split_problems(seed, spec.train_per_level, spec.val_per_level)
    data_mod.write_train_parquet(out / "train.parquet", train)
    for name, problems in val.items():
        data_mod.write_validation_json(out / f"{name}.json", problems)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = build_model(tokenizer, spec)
    easiest = [p for p in train if p.data_source == f"toy-{LEVELS[1].name}"]
    warm_prompts = PromptSet(easiest, tokenizer, spec.max_length, spec.max_length, name="toy warm-up")
    losses = warm_up(model, warm_prompts, spec, seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    accuracy = {name: greedy_accuracy(model, tokenizer, problems) for name, problems in val.items()}
    manifest = {
        "seed": seed, "spec": dataclasses.asdict(spec), "model": "model", "train": "train.parquet",
        "validation": {name: f"{name}.json" for name in val},
        "warmup_loss_first_last": [losses[0], losses[-1]], "greedy_accuracy": accuracy,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def build_toy(dir: Union[str, Path], seed: int = 0, spec: ToySpec = ToySpec()) -> ToyPaths:
    """Build the toy task and model under ``dir`` (or find the cached build) and return its paths.

    The build is written to a temporary directory and renamed into place when complete, under a
    lock, so concurrent callers (several ranks) build once and a killed build leaves no half.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    root = dir / content_hash(seed, spec)
    if (root / MANIFEST).exists():
        return _paths(root)
    with open(dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / MANIFEST).exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=dir))
            try:
                _build(tmp, seed, spec)
                tmp.chmod(0o755)  # mkdtemp makes it private; the build is meant to be shared
                tmp.rename(root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def use_toy(cfg: Config, spec: ToySpec = ToySpec()) -> Config:
    """``cfg`` with every "toy" path (model.path, model.tokenizer, data.train_files and
    validation.files entries) replaced by the toy build's files; ``cfg`` itself if it has none."""
    uses = TOY in (cfg.model.path, cfg.model.tokenizer) or TOY in cfg.data.train_files or TOY in cfg.validation.files
    if not uses:
        return cfg
    where = Path(cfg.toy.dir or default_toy_dir())
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"toy.dir: cannot create {where}: {err.strerror or err}") from None
    paths = build_toy(where, cfg.toy.seed, spec)
    out = copy.deepcopy(cfg)
    if out.model.path == TOY:
        out.model.path = str(paths.model)
    if out.model.tokenizer == TOY:
        out.model.tokenizer = str(paths.model)
    out.data.train_files = [str(paths.train) if f == TOY else f for f in out.data.train_files]
    out.validation.files = [
        str(p) for f in out.validation.files for p in (paths.validation.values() if f == TOY else [f])
    ]
    return out


def load_toy(paths: ToyPaths) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """The warmed-up model (eval mode) and its tokenizer from a build."""
    model = AutoModelForCausalLM.from_pretrained(paths.model)
    return model.eval(), AutoTokenizer.from_pretrained(paths.model)
