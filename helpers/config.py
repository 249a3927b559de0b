"""One config object for the whole series (every notebook's second code cell).

Each notebook has one ``parameters`` cell of literals (MODEL, DATASET, RUN_DIR, ...). The cell
after it calls :func:`start`, which turns those names into a :class:`Config`, checks them, sets
seeds and display options, and opens the notebook's entry in the run manifest. Nothing below that
cell reads the raw names again.

The same names mean the same thing in every notebook; :data:`PARAMETERS` is the one list of them
(``python -m helpers.run -p NAME VALUE`` accepts exactly these).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A parameter has a value the series cannot use; the message says what would work."""


@dataclass
class Config:
    """Every parameter of the series, with its default. Lower-case attributes of the UPPER names;
    a ``Literal`` type lists the only values :func:`check` accepts."""

    # where things go
    run_dir: str = ""  # "" = runs/interactive (helpers.run passes runs/<timestamp>)
    seed: int = 42
    # the model (helpers.models)
    model: str = "embedded"  # "embedded", a Hub id, a local path, or "rehearsal:<name>"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # auto: uint8 in one process, the compute dtype under FSDP
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    memory_budget_gb: float = 0.0  # 0 = the card's memory (CPU: no budget)
    host_memory_budget_gb: float = 0.0  # 0 = detected: the machine's RAM or its container limit
    # LoRA (helpers.lora)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # all-linear | attention | comma-separated module names
    gradient_checkpointing: bool = True
    upcast_norms_and_head: bool = False
    # data (helpers.data)
    dataset: str = "embedded"  # "embedded", a local file, or a Hub dataset id
    dataset_config: str = ""
    dataset_split: str = "train"
    data_format: Literal["text", "template", "instruction", "chat"] = "template"
    text_column: str = "quote"
    template: str = "{quote} ({author})"
    response_only: bool = True
    max_length: int = 128
    packing: bool = True
    eval_fraction: float = 0.1
    max_examples: int = 0  # 0 = all
    # training (helpers.train)
    optimizer: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit",
                       "adamw_torch"] = "paged_adamw_8bit"
    learning_rate: float = 0.0  # 0 = auto: 2e-4 x 4096 / hidden size (2e-4 for 7B models)
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = 5
    max_steps: int = 200
    epochs: float = 0.0  # used when max_steps = 0
    micro_batch: int = 0  # 0 = chosen from the memory budget
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    save_steps: int = 50
    resume: bool = False
    start_over: bool = False  # an earlier run's checkpoints/adapter: moved to previous-<time>/
    chunked_loss: bool = True  # the loss over chunks of positions: no full-sequence logits
    # checkpointed activations in pinned CPU memory (helpers.offload); auto: when the budget
    # needs it (True / False are read as on / off)
    activation_offload: Literal["auto", "on", "off"] = "auto"
    # each block's MLP a chunk of tokens at a time (helpers.tiling); auto: when the budget
    # needs it after ACTIVATION_OFFLOAD (True / False are read as on / off)
    tiled_mlp: Literal["auto", "on", "off"] = "auto"
    # generation (helpers.generate)
    max_new_tokens: int = 40
    prompts: str = ""  # "|"-separated; "" = a few fixed prompts suited to the dataset

    def path(self, *parts: str) -> Path:
        """A path inside the run directory (created)."""
        p = Path(self.run_dir).joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def as_parameters(self) -> dict:
        """The UPPER-case parameter mapping (what the manifest records)."""
        return {f.name.upper(): getattr(self, f.name) for f in dataclasses.fields(self)}

    def changed(self) -> list[tuple[str, str, object, object]]:
        """(group, NAME, value, default) of every parameter that differs from its default."""
        rows, group = [], ""
        for f in dataclasses.fields(self):
            group = GROUPS.get(f.name, group)
            if getattr(self, f.name) != f.default:
                rows.append((group, f.name.upper(), getattr(self, f.name), f.default))
        return rows

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython's text form: the changed ones
        rows = self.changed()
        width = max((len(name) for _, name, _, _ in rows), default=0)
        lines = [f"Config: {len(rows)} of {len(PARAMETERS)} parameters differ from the defaults"]
        lines += [f"  {name:<{width}} = {value!r}   (default {default!r})"
                  for _, name, value, default in rows]
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        from html import escape

        rows = self.changed()
        body = "".join(f"<tr><td>{escape(g)}</td><td><code>{escape(n)}</code></td>"
                       f"<td><code>{escape(repr(v))}</code></td>"
                       f"<td><code>{escape(repr(d))}</code></td></tr>" for g, n, v, d in rows)
        return (f"<b>Config</b>: {len(rows)} of {len(PARAMETERS)} parameters differ from the "
                "defaults (<code>cfg.as_parameters()</code> lists all)"
                "<table><thead><tr><th>group</th><th>parameter</th><th>value</th>"
                f"<th>default</th></tr></thead><tbody>{body}</tbody></table>")


# The first field of each group of Config (its sections above), and the group's name.
GROUPS = {"run_dir": "run", "model": "model", "lora_r": "LoRA", "dataset": "data",
          "optimizer": "training", "max_new_tokens": "generation"}


PARAMETERS: dict = {f.name.upper(): f.default for f in dataclasses.fields(Config)}

def make_config(**parameters) -> Config:
    """Build a Config from UPPER-case parameter names; unknown names and bad values are refused."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)}; valid names: {', '.join(PARAMETERS)}"
        )
    cfg = Config(**{name.lower(): coerce(name, value, PARAMETERS[name])
                    for name, value in parameters.items()})
    check(cfg)
    return cfg


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
_SWITCHES = ("ACTIVATION_OFFLOAD", "TILED_MLP")  # choices of on, off and auto that also take a boolean
_SWITCH_WORDS = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}


def coerce(name: str, value, default):
    """Turn a value (possibly a command-line string) into the type of the parameter's default."""
    kind = type(default)
    if name in _SWITCHES and str(value).strip().lower() in _SWITCH_WORDS:  # given as a boolean
        return _SWITCH_WORDS[str(value).strip().lower()]
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(float(text)) if float(text).is_integer() else int(text)
        if kind is float:
            return float(text)
    except (ValueError, OverflowError):
        raise ConfigError(
            f"{name}={value!r} is not {_KIND_NAMES[kind]}; the default is {default!r}"
        ) from None
    return text


# Optimizers whose state FSDP can shard and save: bitsandbytes' 8-bit states are blockwise
# quantized tensors of their own shapes, which FSDP1's optimizer state dict cannot gather
# (bitsandbytes issue #89), and flattening changes which tensors get 8-bit state (issue #2080).
FSDP_OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit")
MIN_MEMORY_BUDGET_GB = 0.5  # about what the CUDA context alone takes on a card


def _rules(cfg: Config, fsdp: bool):
    """(broken, message) for every rule a parameter or a pair of them must keep."""
    budget = cfg.memory_budget_gb
    yield (cfg.seed < 0 or cfg.seed >= 2**32,
           f"SEED={cfg.seed} must be a whole number from 0 to 4294967295")
    yield (not cfg.model.strip() or cfg.model.strip() == "rehearsal:",
           f"MODEL={cfg.model!r}: give 'embedded', a Hub id, a local folder or 'rehearsal:<name>'")
    yield (budget < 0, f"MEMORY_BUDGET_GB={budget:g} must be >= 0 (0 = the card's whole memory)")
    yield (0 < budget < MIN_MEMORY_BUDGET_GB,
           f"MEMORY_BUDGET_GB={budget:g} is {budget * 1000:.3g} MB (the budget is in GB): a card "
           f"needs about {MIN_MEMORY_BUDGET_GB} GB for its CUDA context alone. Give the memory of "
           "the card to rehearse (e.g. 8 for an 8 GB card), or 0 for the whole card")
    host = cfg.host_memory_budget_gb
    yield (host < 0, f"HOST_MEMORY_BUDGET_GB={host:g} must be >= 0 (0 = the machine's RAM, "
           "detected)")
    yield (0 < host < MIN_MEMORY_BUDGET_GB,
           f"HOST_MEMORY_BUDGET_GB={host:g} is {host * 1000:.3g} MB (the budget is in GB): "
           "give the RAM of the machine to rehearse (e.g. 12.7 for Colab), or 0 to detect it")
    yield (cfg.lora_r <= 0, f"LORA_R={cfg.lora_r} must be a positive integer (8, 16, 64 are usual)")
    yield (cfg.lora_alpha <= 0, f"LORA_ALPHA={cfg.lora_alpha} must be positive (often 2 x LORA_R)")
    yield (not 0 <= cfg.lora_dropout < 1, f"LORA_DROPOUT={cfg.lora_dropout} must be in [0, 1)")
    yield (not cfg.lora_targets.strip(),
           "LORA_TARGETS is empty: use all-linear, attention, or comma-separated module names")
    yield (not cfg.dataset.strip(),
           "DATASET is empty: use 'embedded', a .jsonl/.json/.csv/.parquet/.txt file or a Hub id")
    yield (not cfg.dataset_split.strip(), "DATASET_SPLIT is empty: use 'train' (the usual name)")
    yield (cfg.data_format == "text" and not cfg.text_column.strip(),
           "DATA_FORMAT='text' needs TEXT_COLUMN, the column that holds the text")
    fields = _template_fields(cfg.template)
    yield (cfg.data_format == "template" and isinstance(fields, str),
           f"TEMPLATE={cfg.template!r} is not a valid template ({fields}): write column names in "
           "braces and double a literal brace ({{ or }})")
    yield (cfg.data_format == "template" and fields == [],
           f"TEMPLATE={cfg.template!r} names no column: write the columns in braces, e.g. "
           "'{quote} ({author})'")
    yield (cfg.max_length < 8, f"MAX_LENGTH={cfg.max_length} must be at least 8 tokens")
    yield (not 0 <= cfg.eval_fraction < 1, f"EVAL_FRACTION={cfg.eval_fraction} must be in [0, 1)")
    yield (cfg.max_examples < 0, f"MAX_EXAMPLES={cfg.max_examples} must be >= 0 (0 = all)")
    yield (cfg.learning_rate < 0,
           f"LEARNING_RATE={cfg.learning_rate:g} must be positive (or 0 = auto)")
    yield (cfg.warmup_steps < 0, f"WARMUP_STEPS={cfg.warmup_steps} must be >= 0")
    yield (cfg.max_steps < 0 or cfg.epochs < 0 or (cfg.max_steps == 0 and cfg.epochs <= 0),
           "set MAX_STEPS > 0, or MAX_STEPS = 0 and EPOCHS > 0")
    yield (cfg.micro_batch < 0 or cfg.grad_accum < 1,
           "MICRO_BATCH must be >= 0 (0 = automatic) and GRAD_ACCUM >= 1")
    yield (cfg.max_grad_norm < 0, f"MAX_GRAD_NORM={cfg.max_grad_norm} must be >= 0 (0 = no "
                                  "clipping; 1.0 is usual)")
    yield (cfg.save_steps < 0, f"SAVE_STEPS={cfg.save_steps} must be >= 0 (0 = no checkpoints)")
    yield (cfg.resume and cfg.start_over,
           "RESUME and START_OVER are both True: RESUME continues the run in RUN_DIR, START_OVER "
           "moves it aside and starts again; choose one")
    yield (cfg.activation_offload == "on" and not cfg.gradient_checkpointing,
           "ACTIVATION_OFFLOAD='on' keeps the checkpointed activations in CPU memory: it needs "
           "GRADIENT_CHECKPOINTING = True (or use 'auto' or 'off')")
    yield (cfg.tiled_mlp == "on" and not cfg.gradient_checkpointing,
           "TILED_MLP='on' shrinks the block that gradient checkpointing recomputes in the "
           "backward: it needs GRADIENT_CHECKPOINTING = True (or use 'auto' or 'off')")
    yield (cfg.max_new_tokens < 1, f"MAX_NEW_TOKENS={cfg.max_new_tokens} must be at least 1")
    yield (fsdp and cfg.optimizer not in FSDP_OPTIMIZERS,
           f"OPTIMIZER={cfg.optimizer!r} under FSDP: bitsandbytes' 8-bit optimizer state cannot "
           "be gathered into FSDP checkpoints; use " + " or ".join(FSDP_OPTIMIZERS))
    yield (fsdp and cfg.quant_storage == "uint8",
           "QUANT_STORAGE='uint8' under FSDP: FSDP shards floating-point tensors only; use "
           "'auto' (the compute dtype under FSDP)")


def _template_fields(template: str) -> list | str:
    """The column names a TEMPLATE fills in, or why it cannot be read."""
    import string

    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as err:
        return str(err)


def check(cfg: Config, fsdp: bool | None = None) -> None:
    """Refuse a value outside its valid range, or a pair of values that cannot go together,
    saying what would work: the one list of rules, used by ``python -m helpers.run`` before any
    notebook starts, by :func:`start` in every notebook and by ``python -m helpers.train``.
    ``fsdp``: the run is an FSDP launch (default: as ``accelerate launch`` said)."""
    hints = typing.get_type_hints(Config)
    for name, kind in hints.items():
        value = getattr(cfg, name)
        choices = typing.get_args(kind)
        if choices and value not in choices:
            import difflib

            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
            raise ConfigError(f"{name.upper()}={value!r} is not one of: {', '.join(choices)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name.upper()}={value} is not a finite number")
    if fsdp is None:  # env (and with it torch) is imported only inside an accelerate launch
        fsdp = "ACCELERATE_USE_FSDP" in os.environ and _fsdp_launch()
    for broken, message in _rules(cfg, fsdp):
        if broken:
            raise ConfigError(message)


def _fsdp_launch() -> bool:
    from helpers import env

    return env.fsdp_active()


TRAINING_NOTEBOOK = "05_paged_optimizer_training"  # the notebook that writes checkpoints, adapter


def check_run_dir(cfg: Config, training: bool, own_run: int | None = None,
                  whole: bool = False) -> list:
    """What RUN_DIR holds from an earlier run, before anything is written there: the notes to
    print, or :class:`ConfigError` when nothing should start.

    Folders a kill left aside while they were replaced are put back (:func:`helpers.rundir.
    recover`). A run killed in a notebook (the manifest's running mark, of a process that is gone)
    is noted and recorded as interrupted; a run still going on in the same folder is refused
    (``own_run``: the process id of the ``python -m helpers.run`` that this process belongs to;
    default: the one it said in ``QLORA_RUNNER_PID`` to the notebooks it runs).
    When ``training`` (notebook 05, or a run that includes it), the checkpoints, adapter and
    merged model of an earlier run are never deleted: ``RESUME`` continues from them,
    ``START_OVER`` moves them (``whole``: everything RUN_DIR holds, as ``python -m helpers.run``
    does) to ``RUN_DIR/previous-<time>/``, and neither is refused with the choices. Used by
    ``python -m helpers.run`` before any notebook starts and by :func:`start`."""
    from helpers import manifest, rundir

    run_dir, notes = Path(cfg.run_dir), []
    if own_run is None and os.environ.get("QLORA_RUNNER_PID", "").isdigit():
        own_run = int(os.environ["QLORA_RUNNER_PID"])
    back = rundir.recover(run_dir)
    if back:
        notes.append(f"put back {', '.join(back)}: a kill had left the earlier version aside "
                     "while a new one replaced it")
    mark = manifest.interrupted(run_dir)
    interruption = ""
    if mark and mark.get("pid") != own_run:
        if mark["alive"]:
            raise ConfigError(f"a run (process {mark['pid']}, started {mark.get('started')}) is "
                              f"executing {mark.get('notebook')} in RUN_DIR={str(run_dir)!r} "
                              "now; two runs in one folder overwrite each other's files. Wait "
                              "for it, or choose another RUN_DIR")
        interruption = manifest.interruption_note(mark)
        notes.append(interruption)
        manifest.close_interrupted(run_dir, mark)
    found = rundir.earlier_products(run_dir) if training else {}
    if cfg.start_over and (found or whole):
        moved = rundir.move_aside(run_dir, None if whole else rundir.TRAINING_FILES)
        notes += [rundir.describe_moved(moved)] if moved else []
    elif found and cfg.resume:
        notes.append(f"RESUME = True: continuing the run whose {', '.join(found.values())} "
                     f"{str(run_dir)!r} holds")
    elif found:
        raise ConfigError(
            f"RUN_DIR={str(run_dir)!r} holds an earlier run's {'; '.join(found.values())}"
            + (f" ({interruption})" if interruption else "") + ". A new training would replace "
            "them, so nothing was started and nothing changed. Choose one:\n"
            "  - continue that run: RESUME = True (python -m helpers.run: -p RESUME true)\n"
            "  - keep it and train elsewhere: another RUN_DIR (python -m helpers.run: --run-dir)\n"
            "  - start over: START_OVER = True (-p START_OVER true), which moves the earlier "
            "files into RUN_DIR/previous-<time>/ (nothing is deleted)")
    return notes


def default_run_dir() -> str:
    """``runs/<timestamp>`` under the current directory."""
    import time

    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def start(notebook: str, namespace: dict | None = None, **parameters) -> Config:
    """The second cell of every notebook: parameters -> Config, seeds, display, manifest entry.

    ``notebook`` is the notebook's file stem; ``namespace`` is the notebook's ``globals()``, from
    which every known UPPER-case parameter is taken (its own parameters cell, and any that
    papermill injected). Introduced in notebook 01; used by all.
    """
    from helpers import manifest

    if namespace is not None:
        taken = {k: v for k, v in namespace.items() if k in PARAMETERS}
        parameters = {**taken, **parameters}
    cfg = make_config(**parameters)
    if not cfg.run_dir:
        cfg.run_dir = os.environ.get("QLORA_RUN_DIR") or str(Path("runs") / "interactive")
    try:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(cfg.run_dir) / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write to RUN_DIR={cfg.run_dir!r} ({err.strerror}); choose a writable folder"
        ) from None
    quiet_known_warnings()  # first: importing transformers may import bitsandbytes
    for note in check_run_dir(cfg, training=notebook == TRAINING_NOTEBOOK):
        print(note)
    import matplotlib
    import pandas  # installed with datasets
    import transformers

    transformers.set_seed(cfg.seed)  # Python, NumPy and torch (CPU and every GPU)
    # readable output: the warnings known to be harmless here are silenced by their message,
    # any other still shows; progress bars appear only on waits longer than BAR_DELAY_S
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.set_verbosity_error()
    bars_only_on_long_waits()
    matplotlib.rcParams.update({"figure.dpi": 100, "figure.figsize": (7, 3.5)})
    pandas.set_option("display.max_colwidth", None)  # tables show whole generated texts
    manifest.begin_notebook(cfg.run_dir, notebook, cfg.as_parameters(), budgets(cfg))
    return cfg


def budgets(cfg: Config) -> dict:
    """The notebook's memory budgets in bytes, ``gpu_bytes`` (MEMORY_BUDGET_GB, or the card; 0
    without a GPU) and ``host_bytes`` (HOST_MEMORY_BUDGET_GB, or the RAM detected); a GPU budget
    below the card's memory is enforced from here on, in every notebook."""
    import torch
    from helpers import env

    gpu = 0
    if torch.cuda.is_available():
        card = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        gpu = int(cfg.memory_budget_gb * 1e9) if cfg.memory_budget_gb > 0 else card
        env.enforce_gpu_budget(gpu)
    return {"gpu_bytes": gpu, "host_bytes": env.host_budget_bytes(cfg.host_memory_budget_gb)}


# ------------------------------------------------------------------ what the notebooks show

# Warnings that runs of the series meet and that ask nothing of its user, by the start of their
# message: (category, module that warns, message). Each is filtered alone; any other shows.
HARMLESS_WARNINGS = (
    # peft asks transformers 5 for the old name of a property; nothing for a user to change
    (FutureWarning, "transformers.modeling_utils",
     "`is_gradient_checkpointing` is deprecated and will be removed in v6"),
    # on CPU (the embedded demo without a GPU) there is no unified memory to page to; the same
    # 8-bit optimizer runs, as notebook 01 said it would
    (UserWarning, "bitsandbytes.optim.optimizer", "Paged optimizers are not supported on CPU"),
)
# Log records of the same kind: (logger, start of the message).
HARMLESS_LOG_RECORDS = (
    # bitsandbytes >= 0.49 on CPU: an optional faster kernel from the `kernels` package is missing;
    # its own CPU code runs instead
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropMessages:
    """A logging filter that drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts):
        self.starts = tuple(starts)

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_known_warnings() -> None:
    """Silence :data:`HARMLESS_WARNINGS` and :data:`HARMLESS_LOG_RECORDS`, each by its message."""
    import logging
    import re
    import warnings

    for category, module, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", re.escape(message), category, re.escape(module))
    by_logger: dict = {}
    for name, start in HARMLESS_LOG_RECORDS:
        by_logger.setdefault(name, []).append(start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))


BAR_DELAY_S = 3.0


def bars_only_on_long_waits(delay: float = BAR_DELAY_S) -> None:
    """Every tqdm progress bar (the Hub's downloads, transformers' loading, datasets' steps, the
    training) appears only once its wait has lasted ``delay`` seconds: long waits show progress,
    a step that takes a moment shows nothing. It is tqdm's own ``delay`` (``TQDM_DELAY``), set
    for bars made from now on in this process; a bar that passes ``delay`` itself keeps it."""
    import functools

    import huggingface_hub.utils
    import tqdm.std
    import transformers

    os.environ["TQDM_DELAY"] = str(delay)  # tqdm reads it when first imported
    init = tqdm.std.tqdm.__dict__["__init__"]
    init = getattr(init, "_qlora_original", init)
    original = getattr(init, "func", init)  # a partialmethod holding other TQDM_* settings
    preset = getattr(init, "keywords", {})

    @functools.wraps(original)
    def delayed(self, *args, **kwargs):
        return original(self, *args, **{**preset, "delay": delay, **kwargs})

    delayed._qlora_original = init
    tqdm.std.tqdm.__init__ = delayed
    # a bar's refresh (a new description, say) would show it before its delay: not until then
    refresh = tqdm.std.tqdm.__dict__["refresh"]
    refresh = getattr(refresh, "_qlora_original", refresh)

    @functools.wraps(refresh)
    def refresh_after_delay(self, *args, **kwargs):
        started = getattr(self, "start_t", None)
        if started is not None and self.delay and self._time() - started < self.delay:
            return None
        return refresh(self, *args, **kwargs)

    refresh_after_delay._qlora_original = refresh
    tqdm.std.tqdm.refresh = refresh_after_delay
    transformers.utils.logging.enable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()
