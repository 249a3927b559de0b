"""What "a model" is in the series: where it comes from, and how it is loaded in 4-bit (notebook 02).

``MODEL`` takes one of four kinds of value, and :func:`resolve` says which one it is:

- ``"embedded"``: a small GPT-NeoX (the family of the original QLoRA article) with its own
  byte-level BPE tokenizer, pretrained by :func:`build_embedded` from scratch on a general English
  corpus that every Python installation carries offline: the docstrings of the standard library.
  The build takes about a minute on two CPU cores, is deterministic for a seed, and is cached
  (``QLORA_SERIES_CACHE``, else ``~/.cache/qlora-series``); it is saved in the same layout as a
  Hub model, so loading it in 4-bit exercises exactly the code a Hub model goes through.
- a local folder written by ``save_pretrained`` (``config.json``, weights, tokenizer files);
- a Hugging Face Hub id such as ``EleutherAI/gpt-neox-20b`` (loaded as in the article);
- ``"rehearsal:<name>"``: random weights of a real architecture built directly in 4-bit, layer by
  layer on the target device (:func:`build_rehearsal`), so that the memory and speed of a 20B
  fine-tune can be measured before anything is downloaded. Shipped configurations are listed in
  :data:`REHEARSALS`; a Hub id after ``rehearsal:`` takes that model's ``config.json`` only.

:func:`load_tokenizer` guarantees a real padding token distinct from EOS (padding with EOS masks
every EOS out of the loss and the tuned model never stops); :func:`load_model` loads in 4-bit
with the series' quantization settings and grows the embeddings when the tokenizer gained a
token; :func:`load_16bit` loads without quantization for the merge of notebook 06.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from helpers import env
from helpers.config import ConfigError
from helpers.memory import BITS_PER_PARAM_DQ, BITS_PER_PARAM_NO_DQ, logical_numel

KINDS = ("embedded", "local", "hub", "rehearsal")
REHEARSAL_PREFIX = "rehearsal:"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# Rehearsals shipped as config files in helpers/configs/ (name -> what it stands for).
REHEARSALS: dict = {
    "gpt-neox-20b": "EleutherAI/gpt-neox-20b, 20.6B parameters: the original QLoRA notebook's "
                    "model (16-24 GB cards)",
    "gpt-j-6b": "EleutherAI/gpt-j-6b, 6.1B parameters: the article's choice for a 12 GB card",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B, 8.0B parameters: grouped-query attention, "
                    "128k vocabulary",
    "mistral-7b": "mistralai/Mistral-7B-v0.1, 7.2B parameters: grouped-query attention, "
                  "sliding window",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf, 69.0B parameters: about 35 GB in 4-bit, more "
                   "than one 24 GB card holds (FSDP over several GPUs)",
    "tiny-neox": "a GPT-NeoX of 0.36M parameters (the embedded tokenizer's vocabulary), for tests",
}
# The Hub model each shipped rehearsal stands for (its tokenizer is used when the Hub is reachable).
REHEARSAL_HUB_IDS: dict = {
    "gpt-neox-20b": "EleutherAI/gpt-neox-20b",
    "gpt-j-6b": "EleutherAI/gpt-j-6b",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
}


class ModelUnavailableError(ConfigError):
    """The model named by MODEL cannot be had here; the message lists what can."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from (:func:`resolve`).

    ``kind`` is one of :data:`KINDS`; ``name`` is what to call it in reports; ``path`` is the
    model folder (embedded, local) or the shipped config file (rehearsal); ``hub_id`` is the Hub
    repository (hub, or a rehearsal of a Hub model's config).
    """

    kind: str
    name: str
    path: Path | None = None
    hub_id: str | None = None

    @property
    def location(self) -> str:
        """What ``from_pretrained`` is given: the folder, else the Hub id."""
        return str(self.path) if self.path is not None else str(self.hub_id)


def list_choices() -> str:
    """The values MODEL accepts, in one sentence (for error messages)."""
    rehearsals = ", ".join(f"'{REHEARSAL_PREFIX}{name}'" for name in REHEARSALS)
    return ("MODEL='embedded' (the series' own small GPT-NeoX, built offline), a local folder "
            "written by save_pretrained, a Hub id such as 'EleutherAI/gpt-neox-20b' (needs the "
            f"network), or a rehearsal (random weights of a real architecture): {rehearsals}")


# =============================================================================================
# 1. The embedded model: a small GPT-NeoX pretrained by the series on the standard library's
#    docstrings (introduced in notebook 02, used by every notebook when MODEL="embedded")
# =============================================================================================

# Change the version whenever the recipe below changes: the cache folder is named after it, so a
# new recipe builds a new model instead of reusing an old one.
EMBEDDED_VERSION = "embedded-gpt-neox-v1"

EMBEDDED_RECIPE: dict = {
    # tokenizer
    "vocab_size": 2048,
    # model: every linear dimension a multiple of 64 (the 4-bit block size). Two layers rather
    # than four: in the same minute of CPU time the smaller model sees twice the tokens and ends
    # lower (held-out loss 4.20 against 4.67 in one comparison at equal time on this corpus).
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 512,
    "context": 256,
    "rotary_pct": 0.25,
    # pretraining
    "block": 256,  # tokens per training sequence
    "batch": 8,  # sequences per step
    "steps": 440,  # about a minute on two idle CPU cores (15-20k tokens/s); seconds on a GPU
    "learning_rate": 5e-3,
    "warmup": 30,
    "final_lr_fraction": 0.1,  # cosine decay to this fraction of the peak
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "grad_clip": 1.0,
    "eval_blocks": 16,  # held-out sequences for the before/after loss
    "log_every": 10,
}

# Folders of the standard library that hold tests, tools or third-party code, not documentation.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
              "turtledemo", "__pycache__", "ensurepip"}
_WORD = re.compile(r"[A-Za-z]+")

# "### User:" / "### Assistant:" turns; each assistant turn ends with EOS so that a tuned model
# learns to stop. Rendering a conversation's start gives the same text whether or not more turns
# follow (helpers.data relies on it to find assistant turns for response-only loss).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' -%}"
    "{{ '\\n\\n' }}"
    "{%- endif -%}"
    "{{ '### ' ~ (message['role'] | capitalize) ~ ':\\n' ~ message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages and messages[-1]['role'] == 'assistant' -%}{{ '\\n\\n' }}{%- endif -%}"
    "{{ '### Assistant:\\n' }}"
    "{%- endif -%}"
)


def cache_root() -> Path:
    """Where built models are kept: ``QLORA_SERIES_CACHE``, else ``~/.cache/qlora-series``."""
    root = os.environ.get("QLORA_SERIES_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "qlora-series"


def _expected(seed: int, steps: int | None, recipe: dict | None) -> dict:
    """What a build's report must say for the build to be the one asked for."""
    full = {**EMBEDDED_RECIPE, **(recipe or {})}
    return {"seed": seed, "steps": full["steps"] if steps is None else int(steps),
            "recipe": json.loads(json.dumps(full))}


def _is_built(folder: Path, expected: dict) -> bool:
    """A finished build of this recipe and seed. The report is written last and a folder only
    appears once complete; a build of another recipe (an older version) does not count."""
    names = ("config.json", "model.safetensors", "tokenizer.json", "build_report.json")
    if not all((folder / name).exists() for name in names):
        return False
    try:
        report = json.loads((folder / "build_report.json").read_text())
    except (OSError, ValueError):
        return False
    return all(report.get(key) == value for key, value in expected.items())


def embedded_path(build: bool = True) -> Path:
    """The folder of the embedded model, built first if it is not in the cache (notebook 02).

    With ``build=False`` the path is returned whether or not the model is there yet.
    """
    folder = (cache_root() / EMBEDDED_VERSION).absolute()
    if not build or _is_built(folder, _expected(0, None, None)):
        return folder
    return build_embedded(folder)


@contextlib.contextmanager
def _build_lock(folder: Path):
    """One build at a time per folder, across processes (a test and a notebook, say); the second
    waits for the first and then finds its result."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another process is building {folder.name}; waiting for it", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_embedded(dest=None, seed: int = 0, force: bool = False, *, _steps: int | None = None,
                   _recipe: dict | None = None) -> Path:
    """Build the embedded model into ``dest`` (default: the cache) and return the folder.

    Corpus extraction, tokenizer training, pretraining and saving, all on this machine with no
    network; about a minute on two CPU cores (a CUDA GPU is used when present). The same seed
    gives the same weights on the same machine. The model is built in a temporary folder next to
    ``dest`` and renamed into place, under a file lock, so a half-built model is never seen and
    two processes never build at once. A finished build of the same recipe and seed is reused
    unless ``force``; one of another recipe is replaced.
    (``_steps``/``_recipe`` shorten or vary the recipe, for tests and measurements.)
    """
    if dest is None:
        name = EMBEDDED_VERSION if seed == 0 else f"{EMBEDDED_VERSION}-seed{seed}"
        dest = cache_root() / name
    dest = Path(dest).expanduser().absolute()
    expected = _expected(seed, _steps, _recipe)
    with _build_lock(dest):
        if not force and _is_built(dest, expected):
            return dest
        print(f"building the embedded model into {dest} (about a minute on two CPU cores, "
              "once; cached afterwards)", flush=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
        try:
            _build_into(work, seed=seed, steps=_steps, recipe=_recipe)
            work.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.replace(dest, old / "model")
                os.replace(work, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(work, dest)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    report = build_report(dest)
    print(f"built in {report['seconds']['total']:.0f} s: {report['parameters']:,} parameters, "
          f"loss {report['initial_loss']:.2f} -> {report['final_loss']:.2f} on "
          f"{report['tokens_seen']:,} tokens", flush=True)
    return dest


def _docstrings_of(source: str) -> list[str]:
    """Docstrings of a module and of the classes and functions in it, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                found.append(doc)
        for field in ("body", "orelse", "finalbody", "handlers"):
            for child in getattr(node, field, ()) or ():
                if isinstance(child, (ast.stmt, ast.excepthandler)):
                    visit(child)

    visit(tree)
    return found


def _is_prose(line: str) -> bool:
    """A line of English rather than code, a doctest or a table rule."""
    text = line.strip()
    if not text or text.startswith((">>>", "...", "$ ", "%")):
        return False
    if sum(c.isalpha() or c == " " for c in text) < 0.8 * len(text):
        return False
    return len(_WORD.findall(text)) >= 2


def clean_docstring(doc: str) -> str:
    """A docstring as plain paragraphs: code, doctest and table lines dropped, each paragraph's
    hard-wrapped lines joined into one line, paragraphs of fewer than three words dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [line.strip() for line in block.splitlines() if _is_prose(line)]
        text = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if len(_WORD.findall(text)) >= 3:
            paragraphs.append(text)
    return "\n".join(paragraphs)


def stdlib_corpus() -> tuple[list[str], dict]:
    """The pretraining corpus: the cleaned docstrings of the installed Python standard library
    (tests, IDLE, lib2to3 and site-packages left out), files in sorted order, duplicates dropped.

    Returns the documents and a summary (files, documents, characters, Python version). Read
    once per process (a few seconds).
    """
    docs, summary = _stdlib_corpus()
    return list(docs), dict(summary)


@functools.lru_cache(maxsize=1)
def _stdlib_corpus() -> tuple[tuple, dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs
                            if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    docs, seen = [], set()
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for raw in _docstrings_of(source):
            text = clean_docstring(raw)
            if text and text not in seen:
                seen.add(text)
                docs.append(text)
    if not docs:
        raise FileNotFoundError(
            f"no docstrings found under the standard library folder {root}; the embedded model "
            "needs a Python installation with its .py sources (not only .pyc files)")
    summary = {"files": len(files), "documents": len(docs),
               "characters": sum(len(d) for d in docs),
               "python": ".".join(map(str, sys.version_info[:3]))}
    return tuple(docs), summary


def train_tokenizer(docs: list[str], vocab_size: int, context: int):
    """A byte-level BPE tokenizer trained on ``docs``, wrapped for transformers.

    ``<|endoftext|>`` is BOS and EOS, ``<|pad|>`` a separate padding token; the chat template
    renders "### User:" / "### Assistant:" turns.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer, length=len(docs))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=context, padding_side="right", chat_template=CHAT_TEMPLATE)


def _embedded_config(recipe: dict, tokenizer):
    from transformers import GPTNeoXConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=recipe["hidden_size"],
        num_hidden_layers=recipe["num_layers"], num_attention_heads=recipe["num_heads"],
        intermediate_size=recipe["intermediate_size"], max_position_embeddings=recipe["context"],
        rotary_pct=recipe["rotary_pct"], use_parallel_residual=True, hidden_act="gelu",
        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
        architectures=["GPTNeoXForCausalLM"])


def _cosine_lr(step: int, recipe: dict, steps: int) -> float:
    peak, warmup = recipe["learning_rate"], recipe["warmup"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    low = recipe["final_lr_fraction"]
    return peak * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def _eval_loss(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [model(input_ids=blocks[i:i + batch], labels=blocks[i:i + batch]).loss.item()
              for i in range(0, len(blocks), batch)]
    model.train()
    return sum(losses) / len(losses)


@contextlib.contextmanager
def _quiet_progress():
    """No progress bar while saving a 5 MB model."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _portable(folder: Path) -> None:
    """Files any transformers >= 4.51 loads (transformers 5 names its fast tokenizer class
    TokenizersBackend, unknown to 4.x; PreTrainedTokenizerFast is the same class in both), and
    readable by every user of a shared cache."""
    config_file = folder / "tokenizer_config.json"
    if config_file.exists():
        values = json.loads(config_file.read_text())
        values["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(values, indent=2) + "\n")
    for path in folder.iterdir():
        path.chmod(0o644)


def _build_into(folder: Path, seed: int, steps: int | None, recipe: dict | None) -> None:
    """Corpus -> tokenizer -> pretraining -> save_pretrained + build_report.json."""
    import tokenizers
    import transformers
    from transformers import GenerationConfig, GPTNeoXForCausalLM

    recipe = {**EMBEDDED_RECIPE, **(recipe or {})}
    steps = recipe["steps"] if steps is None else int(steps)
    started = time.perf_counter()
    seconds = {}

    docs, corpus = stdlib_corpus()
    seconds["corpus"] = time.perf_counter() - started

    mark = time.perf_counter()
    tokenizer = train_tokenizer(docs, recipe["vocab_size"], recipe["context"])
    eos = tokenizer.eos_token_id
    ids = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids += encoding.ids + [eos]
    corpus["tokens"] = len(ids)
    seconds["tokenizer"] = time.perf_counter() - mark

    mark = time.perf_counter()
    device = torch.device(env.device())
    # the caller's random state is left as it was (a notebook seeds its own)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        order = torch.Generator().manual_seed(seed)
        block = recipe["block"]
        blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
        shuffled = blocks[torch.randperm(len(blocks), generator=order)]
        held_out = shuffled[: recipe["eval_blocks"]].to(device)
        train_blocks = shuffled[recipe["eval_blocks"]:]

        model = GPTNeoXForCausalLM(_embedded_config(recipe, tokenizer)).to(device)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe["weight_decay"]},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe["learning_rate"], betas=recipe["betas"])
        initial_eval = _eval_loss(model, held_out, recipe["batch"])

        batch, log_every = recipe["batch"], recipe["log_every"]
        curve, window, position = [], [], len(train_blocks)
        epoch_order = torch.arange(0)
        for step in range(steps):
            if position + batch > len(train_blocks):
                epoch_order, position = torch.randperm(len(train_blocks), generator=order), 0
            x = train_blocks[epoch_order[position:position + batch]].to(device)
            position += batch
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, recipe, steps)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                curve.append({"step": step + 1, "loss": round(sum(window) / len(window), 4)})
                window = []
        final_eval = _eval_loss(model, held_out, recipe["batch"])
    seconds["pretraining"] = time.perf_counter() - mark

    mark = time.perf_counter()
    model = model.to("cpu").eval()
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    with _quiet_progress():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _portable(folder)
    seconds["save"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started

    report = {
        "version": EMBEDDED_VERSION,
        "seed": seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": corpus,
        "steps": steps,
        "tokens_seen": steps * batch * block,
        "epochs": round(steps * batch / max(1, len(train_blocks)), 3),
        "initial_loss": round(initial_eval, 4),
        "final_loss": curve[-1]["loss"] if curve else None,
        "eval_loss_before": round(initial_eval, 4),
        "eval_loss_after": round(final_eval, 4),
        "loss_curve": curve,
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
        "versions": {"python": corpus["python"], "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    (folder / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")


def build_report(path=None) -> dict:
    """The embedded model's ``build_report.json`` (seed, seconds, losses, corpus, versions)."""
    folder = Path(path) if path is not None else embedded_path()
    return json.loads((folder / "build_report.json").read_text())


# =============================================================================================
# 2. Resolving and loading a model (notebook 02; used by 03-06)
# =============================================================================================

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve(model, build: bool = True) -> ModelSource:
    """Which kind of model MODEL names (notebook 02).

    "embedded" -> the embedded model's folder (built first if needed, unless ``build=False``);
    an existing folder with ``config.json`` -> local; "rehearsal:<name>" -> a rehearsal of a
    shipped config or of a Hub id's config; anything shaped like ``owner/name`` -> a Hub id.
    """
    if isinstance(model, ModelSource):
        return model
    text = str(model).strip()
    if not text:
        raise ConfigError(f"MODEL is empty; choose {list_choices()}")
    if text.lower() == "embedded":
        return ModelSource("embedded", EMBEDDED_VERSION, path=embedded_path(build=build))
    if text.lower().startswith(REHEARSAL_PREFIX):
        name = text[len(REHEARSAL_PREFIX):].strip()
        if name in REHEARSALS:
            return ModelSource("rehearsal", name, path=CONFIGS_DIR / f"{name}.json",
                               hub_id=REHEARSAL_HUB_IDS.get(name))
        if "/" in name and _HUB_ID.match(name):
            return ModelSource("rehearsal", name, hub_id=name)
        raise ConfigError(f"MODEL={text!r}: no rehearsal named {name!r}; shipped: "
                          f"{', '.join(REHEARSALS)}; or 'rehearsal:<Hub id>' for any Hub "
                          "model's config")
    folder = Path(text).expanduser()
    if folder.is_dir():
        if (folder / "config.json").exists():
            return ModelSource("local", folder.name, path=folder.resolve())
        raise FileNotFoundError(
            f"MODEL={text!r} is a folder without config.json; give a folder written by "
            "model.save_pretrained(...) (config.json and weights), or choose " + list_choices())
    if folder.exists():
        raise ConfigError(f"MODEL={text!r} is a file; give the folder that holds config.json "
                          "and the weights")
    if text.startswith((".", "/", "~")) or "\\" in text or not _HUB_ID.match(text):
        raise FileNotFoundError(f"MODEL={text!r}: no such folder, and not a Hub id "
                                f"('owner/name'); choose {list_choices()}")
    return ModelSource("hub", text, hub_id=text)


def _compute_dtype(compute_dtype) -> torch.dtype:
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    return env.compute_dtype(compute_dtype or "auto")


def _quant_storage(quant_storage, compute: torch.dtype) -> torch.dtype:
    if isinstance(quant_storage, torch.dtype):
        return quant_storage
    try:
        return env.quant_storage_dtype(quant_storage or "auto", compute)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def quantization_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype=None,
                        quant_storage="uint8"):
    """The 4-bit settings of the series as a ``BitsAndBytesConfig`` (notebook 02).

    ``compute_dtype``: a torch dtype, a name ("bfloat16", ...) or None/"auto" for
    :func:`helpers.env.compute_dtype` (bf16 on capability >= 8, fp16 on older GPUs, fp32 on CPU).
    ``quant_storage``: the dtype the packed 4-bit values are stored in (``uint8``; under FSDP the
    compute dtype, see :func:`helpers.env.quant_storage_dtype`; "auto" decides by the launch).
    """
    from transformers import BitsAndBytesConfig

    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"QUANT_TYPE={quant_type!r}: use 'nf4' (the QLoRA default) or 'fp4'")
    compute = _compute_dtype(compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=bool(double_quant),
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=_quant_storage(quant_storage, compute))


def _hub_failure(source: ModelSource, err: Exception, reachable: bool) -> ModelUnavailableError:
    """A clear error for a Hub model that could not be had."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = str(err).lower()
    if "gated" in text or "401" in text or "403" in text or "restricted" in text:
        why = (f"'{source.hub_id}' is gated or private on the Hugging Face Hub: accept its "
               "license on its Hub page and log in (huggingface-cli login, or HF_TOKEN)")
    elif "not a valid model identifier" in text or "404" in text or "repository not found" in text:
        why = f"the Hugging Face Hub has no model '{source.hub_id}' (check the spelling)"
    elif reachable:
        why = f"loading '{source.hub_id}' from the Hugging Face Hub failed"
    else:
        offline = (" (HF_HUB_OFFLINE is set)" if env.flag("HF_HUB_OFFLINE")
                   else " (no network) and it is not in the local Hub cache")
        why = f"cannot reach the Hugging Face Hub for '{source.hub_id}'{offline}"
    return ModelUnavailableError(f"{why} [{reason}]; choose {list_choices()}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all, found in at most ``timeout`` seconds.

    Without it, a Hub id on a machine with no network waits through the Hub client's retries
    (about 25 s per file, a minute or more per model) before failing. Behind a proxy
    (HTTPS_PROXY / ALL_PROXY) the Hub is assumed reachable.
    """
    import socket
    from urllib.parse import urlparse

    if env.flag("HF_HUB_OFFLINE") or env.flag("TRANSFORMERS_OFFLINE"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(loader, source: ModelSource, **kwargs):
    """``loader.from_pretrained`` with Hub failures turned into one clear error.

    When the Hub cannot be reached, only files already in the local Hub cache are used
    (``local_files_only``), so the answer comes in seconds instead of after every retry.
    """
    if source.kind != "hub":
        return loader.from_pretrained(source.location, **kwargs)
    hub_errors: tuple = (OSError,)
    try:
        from huggingface_hub.errors import HFValidationError

        hub_errors += (HFValidationError,)
    except ImportError:  # pragma: no cover
        pass
    reachable = hub_reachable()
    if not reachable:
        kwargs["local_files_only"] = True
        if hasattr(loader, "_model_mapping"):  # an AutoModel class: its adapter lookup too
            kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        return loader.from_pretrained(source.location, **kwargs)
    except hub_errors as err:
        raise _hub_failure(source, err, reachable) from err


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a padding token distinct from EOS (notebook 04).

    Padding with EOS, as the original recipe does, makes the data collator mask every EOS out of
    the labels, and the tuned model never learns to stop. An existing ``<|pad|>`` token is used
    when the vocabulary has one; otherwise it is added as a special token (then the model's
    embeddings must grow: :func:`load_model` does that).
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def load_tokenizer(model, padding_side: str = "right"):
    """The tokenizer of MODEL, with a real padding token and right padding for training
    (notebook 02).

    A rehearsal has no tokenizer of its own: it uses the real model's tokenizer when the Hub is
    reachable, else the embedded model's (its ids fit every shipped architecture's vocabulary).
    """
    from transformers import AutoTokenizer

    source = resolve(model)
    if source.kind == "rehearsal":
        tokenizer = _rehearsal_tokenizer(source)
    else:
        tokenizer = _from_pretrained(AutoTokenizer, source)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def _device(device=None) -> torch.device:
    dev = torch.device(device if device is not None else env.device())
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _device_map(dev: torch.device) -> dict:
    return {"": dev.index} if dev.type == "cuda" else {"": str(dev)}


def _dtype_kwarg(dtype) -> dict:
    """``dtype=`` (transformers >= 4.56) or ``torch_dtype=`` (older)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def fit_embeddings(model, tokenizer) -> bool:
    """Grow the embeddings (and head) when the tokenizer has more tokens than the model has rows,
    and tell the model which ids pad and end; True if it grew (notebook 02)."""
    rows = model.get_input_embeddings().weight.shape[0]
    grew = len(tokenizer) > rows
    if grew:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        config.pad_token_id = tokenizer.pad_token_id
        if getattr(config, "eos_token_id", None) is None:
            config.eos_token_id = tokenizer.eos_token_id
    return grew


def cpu_safe(model):
    """Keep 4-bit layers trainable on CPU (notebooks 02-06).

    bitsandbytes 0.50 repacks each ``Linear4bit`` weight for fast CPU inference on its first
    forward in eval mode without gradients, on processors with AVX512-BF16; training afterwards
    fails ("a view of a leaf Variable that requires grad is being used in an in-place
    operation"). This turns that repacking off (and undoes it where it already happened).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - no 4-bit layers without bitsandbytes
        return model
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
    except ImportError:  # pragma: no cover - other bitsandbytes versions
        unpack = None
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if unpack is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)
            module.quant_state = module.weight.quant_state
    return model


def load_model(model, *, quant_type: str = "nf4", double_quant: bool = True,
               compute_dtype="auto", device=None, tokenizer=None, quant_storage="auto"):
    """MODEL loaded in 4-bit, as the article does, on the GPU (or on CPU) (notebook 02).

    ``from_pretrained(..., quantization_config=..., device_map={"": 0} or {"": "cpu"},
    dtype=compute dtype)``: every linear layer but the output head becomes a bitsandbytes
    ``Linear4bit``; embeddings, norms and head stay in the compute dtype. A rehearsal is built
    layer by layer instead (:func:`build_rehearsal`). The embeddings grow when the tokenizer
    (given, or :func:`load_tokenizer`'s) has more tokens than the model has rows. On CPU,
    :func:`cpu_safe` is applied.

    ``quant_storage`` ("auto": ``uint8``, or the compute dtype inside an FSDP launch; see
    :func:`helpers.env.quant_storage_dtype`). Under FSDP, with no ``device`` given, a Hub or local
    model is loaded without a device map, in the storage dtype, as transformers' FSDP-QLoRA
    loading expects (FSDP places the shards), and a rehearsal is built in CPU RAM, where FSDP
    takes it from (``fsdp_sync_module_states``).
    """
    from transformers import AutoModelForCausalLM

    source = resolve(model)
    fsdp = env.fsdp_active() and device is None
    dev = torch.device("cpu") if fsdp and source.kind == "rehearsal" else _device(device)
    # under FSDP a rehearsal is drawn and quantized on this process's GPU, layer by layer, and
    # kept in CPU RAM (a 70B model in minutes of CPU time otherwise)
    build_on = None
    if fsdp and source.kind == "rehearsal" and torch.cuda.is_available():
        from helpers import distributed

        build_on = torch.device("cuda", distributed.world()["local_rank"])
    dtype = _compute_dtype(compute_dtype)
    storage = _quant_storage(quant_storage, dtype)
    if source.kind == "rehearsal":
        loaded = build_rehearsal(source, quant_type=quant_type, double_quant=double_quant,
                                 compute_dtype=dtype, device=dev, quant_storage=storage,
                                 build_device=build_on)
    else:
        qc = quantization_config(quant_type, double_quant, dtype, storage)
        placement = {"device_map": _device_map(dev)} if not fsdp else {}
        load_dtype = storage if (fsdp and storage.is_floating_point) else dtype
        loaded = _from_pretrained(AutoModelForCausalLM, source, quantization_config=qc,
                                  low_cpu_mem_usage=True, **placement,
                                  **_dtype_kwarg(load_dtype))
        if dev.type == "cpu":  # build_rehearsal does it for a rehearsal
            cpu_safe(loaded)
    fit_embeddings(loaded, tokenizer if tokenizer is not None else load_tokenizer(source))
    return loaded


def load_16bit(model, dtype=None, *, device=None, tokenizer=None):
    """MODEL without quantization, to merge an adapter into (notebook 06).

    ``dtype`` defaults to float32 on CPU and to the compute dtype on a GPU (bf16 or fp16).
    The embeddings grow as in :func:`load_model`, so an adapter trained there fits. A rehearsal
    gives the same random weights its 4-bit build quantized (same seed), unquantized.
    """
    from transformers import AutoModelForCausalLM

    source = resolve(model)
    dev = _device(device)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else env.compute_dtype()
    dtype = _compute_dtype(dtype)
    if source.kind == "rehearsal":
        loaded = build_rehearsal(source, compute_dtype=dtype, device=dev, quantize=False)
    else:
        loaded = _from_pretrained(AutoModelForCausalLM, source, device_map=_device_map(dev),
                                  low_cpu_mem_usage=True, **_dtype_kwarg(dtype))
    fit_embeddings(loaded, tokenizer if tokenizer is not None else load_tokenizer(source))
    return loaded


def describe(model) -> dict:
    """Architecture, size and precision of a loaded model, as one flat dict (notebook 02)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    four_bit = other = 0
    dtypes: dict = {}
    for param in base.parameters():
        if type(param).__name__ == "Params4bit":
            four_bit += logical_numel(param)
        else:
            other += param.numel()
            key = str(param.dtype).replace("torch.", "")
            dtypes[key] = dtypes.get(key, 0) + param.numel()
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    architectures = getattr(config, "architectures", None) or [type(base).__name__]
    try:
        import bitsandbytes as bnb

        linear4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    except ImportError:  # pragma: no cover - no 4-bit layers without bitsandbytes
        linear4 = 0
    return {
        "name": str(getattr(config, "name_or_path", "") or getattr(base, "name_or_path", "")),
        "architecture": architectures[0],
        "model_type": config.model_type,
        "parameters": four_bit + other,
        "parameters_4bit": four_bit,
        "parameters_other": other,
        "layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "attention_heads": getattr(text, "num_attention_heads", None),
        "vocab_size": base.get_input_embeddings().weight.shape[0],
        "context": getattr(text, "max_position_embeddings", None),
        "linear_4bit_layers": linear4,
        "dtype_other": max(dtypes, key=dtypes.get) if dtypes else None,
        "quant_type": quant.get("bnb_4bit_quant_type") if quant else None,
        "double_quant": quant.get("bnb_4bit_use_double_quant") if quant else None,
        "footprint_bytes": base.get_memory_footprint(),
        "device": str(next(base.parameters()).device),
    }


# =============================================================================================
# 3. Rehearsals: random weights of a real architecture, built directly in 4-bit (notebook 02)
# =============================================================================================


def rehearsal_config(name):
    """The transformers config of a rehearsal: a shipped file, or a Hub id's ``config.json``."""
    from transformers import AutoConfig

    source = name if isinstance(name, ModelSource) else resolve(
        name if str(name).startswith(REHEARSAL_PREFIX) else REHEARSAL_PREFIX + str(name))
    if source.kind != "rehearsal":
        raise ConfigError(f"{source.name!r} is not a rehearsal; use 'rehearsal:<name>'")
    if source.path is not None:
        values = json.loads(source.path.read_text())
        config = AutoConfig.for_model(**values)
    else:
        config = _from_pretrained(AutoConfig, ModelSource("hub", source.name,
                                                          hub_id=source.hub_id))
    config.name_or_path = f"{REHEARSAL_PREFIX}{source.name}"
    return config


def _rehearsal_tokenizer(source: ModelSource):
    """The real model's tokenizer when the Hub (or its local cache) has it, else the embedded
    model's tokenizer, whose ids fit every shipped architecture's vocabulary."""
    from transformers import AutoTokenizer

    if source.hub_id:
        try:
            return _from_pretrained(AutoTokenizer, ModelSource("hub", source.hub_id,
                                                               hub_id=source.hub_id))
        except ModelUnavailableError as err:
            print(f"note: no tokenizer of {source.hub_id} here ({str(err).split(' [')[0]}); "
                  "the rehearsal uses the embedded model's tokenizer")
    return AutoTokenizer.from_pretrained(str(embedded_path()))


def _tensor_seed(seed: int, name: str) -> int:
    """A seed per parameter, from the build seed and the parameter's name (stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def _free_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    import psutil

    return psutil.virtual_memory().available


def _check_room(model, name: str, dev: torch.device, double_quant: bool) -> None:
    """Refuse, before anything is made, a rehearsal that cannot fit where it is to be built."""
    bits = BITS_PER_PARAM_DQ if double_quant else BITS_PER_PARAM_NO_DQ
    need = largest = 0
    for param in model.parameters():
        if type(param).__name__ == "Params4bit":
            need += param.numel() * bits / 8
            largest = max(largest, param.numel() * 2)  # its 16-bit form, briefly
        else:
            need += param.numel() * param.element_size()
    need += largest
    free = _free_bytes(dev)
    if need > free:
        others = ", ".join(f"'{REHEARSAL_PREFIX}{n}'" for n in REHEARSALS
                           if f"{REHEARSAL_PREFIX}{n}" != name)
        raise ModelUnavailableError(
            f"{name} needs about {need / 2**30:.1f} GiB on {dev} and {free / 2**30:.1f} GiB are "
            f"free; choose a smaller model ({others}) or a machine with more memory")


def build_rehearsal(name, *, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype=None, device=None, seed: int = 0, quantize: bool = True,
                    quant_storage="uint8", build_device=None):
    """A real architecture with random weights, built directly in 4-bit (notebook 02).

    The model's skeleton is made on the ``meta`` device (no memory); every linear layer but the
    output head is replaced by a bitsandbytes ``Linear4bit``; then each layer in turn gets a
    random 16-bit weight (normal, std = the config's ``initializer_range``) generated on the
    target device, quantized there, and the 16-bit tensor is freed at once: the 16-bit model is
    never held anywhere. Embeddings, norms and head are made in the compute dtype directly on the
    device. The result looks to transformers, peft and the Trainer like a model loaded with
    ``from_pretrained(quantization_config=...)``. On a GPU, GPT-NeoX-20B takes about 11 GB.

    ``quantize=False`` builds the same random weights unquantized (what :func:`load_16bit` gives).
    ``quant_storage``: the dtype the packed 4-bit values are stored in (``uint8``; the compute
    dtype for FSDP; "auto" as in :func:`load_model`).
    """
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = rehearsal_config(name)
    dev = _device(device)
    # where the random values are drawn and quantized (a GPU is hundreds of times faster than a
    # CPU at it); each finished tensor then moves to ``dev``
    make = torch.device(build_device) if build_device is not None else dev
    dtype = _compute_dtype(compute_dtype)
    storage = _quant_storage(quant_storage, dtype)
    qc = quantization_config(quant_type, double_quant, dtype, storage) if quantize else None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(dtype))
    head = model.get_output_embeddings()

    if quantize:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child is not head:
                    setattr(parent, child_name, bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None,
                        compute_dtype=dtype, compress_statistics=bool(double_quant),
                        quant_type=quant_type, quant_storage=storage, device="meta"))

    _check_room(model, config.name_or_path, dev, double_quant)
    std = getattr(config, "initializer_range", 0.02)
    generator = torch.Generator(device=make)
    for module_name, module in model.named_modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            generator.manual_seed(_tensor_seed(seed, full_name))
            if param_name == "bias":
                value = torch.zeros(param.shape, dtype=dtype, device=make)
            elif _is_norm(module):
                value = torch.ones(param.shape, dtype=dtype, device=make)
            else:
                value = torch.empty(param.shape, dtype=dtype, device=make)
                value.normal_(0.0, std, generator=generator)
            if isinstance(module, bnb.nn.Linear4bit) and param_name == "weight":
                # quantized on its way to the device; the 16-bit tensor is dropped right after
                module.weight = bnb.nn.Params4bit(
                    value, requires_grad=False, quant_type=quant_type,
                    compress_statistics=bool(double_quant), quant_storage=storage,
                    module=module).to(make)
                if make != dev:  # quant_state moves with it, in place (the module shares it)
                    module.weight = module.weight.to(dev)
            else:
                module._parameters[param_name] = nn.Parameter(
                    value.to(dev), requires_grad=param.requires_grad)
            del value
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != dev and not buffer.is_meta:
                module._buffers[buffer_name] = buffer.to(dev)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise RuntimeError(f"rehearsal of {config.name_or_path}: tensors left unmade: {left[:5]}")

    if quantize:
        from transformers.quantizers import AutoHfQuantizer

        # what from_pretrained(quantization_config=...) leaves on a 4-bit model
        model.hf_quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
        model.is_quantized = True
        model.is_loaded_in_4bit = True
        model.quantization_method = qc.quant_method
        model.config.quantization_config = qc
        model.config._is_quantized = True
    model.name_or_path = config.name_or_path
    model.eval()
    if dev.type == "cpu":
        cpu_safe(model)
    return model


def load_config(model):
    """MODEL's transformers config without its weights (for the estimator, notebook 02): the
    embedded model's, a local folder's, a Hub id's, or a rehearsal's shipped config."""
    from transformers import AutoConfig

    source = model if isinstance(model, ModelSource) else resolve(model)
    if source.kind == "rehearsal":
        return rehearsal_config(source)
    return _from_pretrained(AutoConfig, source)
