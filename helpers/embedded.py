"""The embedded base model: a small GPT-NeoX with its own byte-level BPE tokenizer, pretrained by
:func:`build_embedded` from scratch on the docstrings of the Python standard library (a general
English corpus every machine has offline), deterministic for a seed and cached
(``QLORA_SERIES_CACHE``, else ``~/.cache/qlora-series``), saved in the Hub's layout. The
series' default MODEL (notebook 02).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
import torch
from filelock import FileLock, Timeout
from helpers import env
from helpers.tokens import EOS_TOKEN, PAD_TOKEN


# Change the version whenever the recipe below changes: the cache folder is named after it, so a
# new recipe builds a new model instead of reusing an old one.
EMBEDDED_VERSION = "embedded-gpt-neox-v2"  # v2: transformers' cosine schedule (v1 hand-written)

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

    Built models are kept in ``QLORA_SERIES_CACHE``, else ``~/.cache/qlora-series``. With
    ``build=False`` the path is returned whether or not the model is there yet.
    """
    root = os.environ.get("QLORA_SERIES_CACHE")
    cache = Path(root).expanduser() if root else Path.home() / ".cache" / "qlora-series"
    folder = (cache / EMBEDDED_VERSION).absolute()
    if not build or _is_built(folder, _expected(0, None, None)):
        return folder
    return build_embedded(folder)


def build_embedded(dest, seed: int = 0, *, _steps: int | None = None,
                   _recipe: dict | None = None) -> Path:
    """Build the embedded model into the folder ``dest`` and return it (:func:`embedded_path`
    builds into the cache).

    Corpus extraction, tokenizer training, pretraining and saving, all on this machine with no
    network; about a minute on two CPU cores (a CUDA GPU is used when present). The same seed
    gives the same weights on the same machine. The model is built in a temporary folder next to
    ``dest`` and renamed into place, under a file lock (``filelock``, as the Hub client locks its
    cache), so a half-built model is never seen and two processes never build at once. A
    finished build of the same recipe and seed is reused; one of another recipe is replaced.
    (``_steps``/``_recipe`` shorten or vary the recipe, for tests and measurements.)
    """
    dest = Path(dest).expanduser().absolute()
    expected = _expected(seed, _steps, _recipe)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(dest.parent / f".{dest.name}.lock")
    try:
        held = lock.acquire(timeout=0)
    except Timeout:
        print(f"another process is building {dest.name}; waiting for it", flush=True)
        held = lock.acquire()
    with held:
        if _is_built(dest, expected):
            return dest
        print(f"building the embedded model into {dest} (about a minute on two CPU cores, "
              "once; cached afterwards)", flush=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
        try:
            _build_into(work, seed=seed, steps=_steps, recipe=_recipe)
            work.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            if dest.exists():  # moved aside first: a folder cannot be renamed onto a full one
                os.replace(dest, old / "model")
            os.replace(work, dest)
            shutil.rmtree(old, ignore_errors=True)
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


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> tuple[tuple, dict]:
    """The pretraining corpus: the cleaned docstrings of the installed Python standard library
    (tests, IDLE, lib2to3 and site-packages left out), files in sorted order, duplicates dropped.

    Returns the documents and a summary (files, documents, characters, Python version). Read
    once per process (a few seconds); the caller copies the summary before changing it.
    """
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


@torch.no_grad()
def _eval_loss(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [model(input_ids=blocks[i:i + batch], labels=blocks[i:i + batch]).loss.item()
              for i in range(0, len(blocks), batch)]
    model.train()
    return sum(losses) / len(losses)


def _progress(steps: int):
    """A bar over the pretraining steps: a widget in Jupyter, text redrawn every 10 s elsewhere."""
    if env.has_frontend():
        from tqdm.auto import tqdm

        return tqdm(total=steps, desc="pretraining the embedded model", unit="step")
    from tqdm import tqdm

    return tqdm(total=steps, desc="pretraining the embedded model", unit="step",
                mininterval=10, dynamic_ncols=True)


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
    """Corpus -> tokenizer -> pretraining -> save_pretrained + build_report.json.

    The pretraining loop is written out rather than run by ``Trainer``: the build happens in
    whichever process first asks for the model, under a file lock, and under a multi-GPU launch
    ``Trainer`` would start a process group and wrap the model for ranks that are waiting on that
    lock (a deadlock); it would also reseed the caller's Python and NumPy random state.
    """
    import tokenizers
    import transformers
    from transformers import GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    recipe = {**EMBEDDED_RECIPE, **(recipe or {})}
    steps = recipe["steps"] if steps is None else int(steps)
    started = time.perf_counter()
    seconds = {}

    docs, corpus = stdlib_corpus()
    docs, corpus = list(docs), dict(corpus)
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

        config = GPTNeoXConfig(
            vocab_size=len(tokenizer), hidden_size=recipe["hidden_size"],
            num_hidden_layers=recipe["num_layers"], num_attention_heads=recipe["num_heads"],
            intermediate_size=recipe["intermediate_size"],
            max_position_embeddings=recipe["context"], rotary_pct=recipe["rotary_pct"],
            use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            architectures=["GPTNeoXForCausalLM"])
        model = GPTNeoXForCausalLM(config).to(device)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe["weight_decay"]},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe["learning_rate"], betas=recipe["betas"])
        schedule = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, recipe["warmup"], steps, min_lr_rate=recipe["final_lr_fraction"])
        initial_eval = _eval_loss(model, held_out, recipe["batch"])

        batch, log_every = recipe["batch"], recipe["log_every"]
        curve, window, position = [], [], len(train_blocks)
        epoch_order = torch.arange(0)
        bar = _progress(steps)
        for step in range(steps):
            if position + batch > len(train_blocks):
                epoch_order, position = torch.randperm(len(train_blocks), generator=order), 0
            x = train_blocks[epoch_order[position:position + batch]].to(device)
            position += batch
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                curve.append({"step": step + 1, "loss": round(sum(window) / len(window), 4)})
                bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", refresh=False)
                window = []
            bar.update(1)
        bar.close()
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
