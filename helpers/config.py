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
    chunked_loss: bool = True  # the loss over chunks of positions: no full-sequence logits
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


def coerce(name: str, value, default):
    """Turn a value (possibly a command-line string) into the type of the parameter's default."""
    kind = type(default)
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
    except ValueError:
        raise ConfigError(
            f"{name}={value!r} is not a {kind.__name__}; the default is {default!r}"
        ) from None
    return text


def check(cfg: Config) -> None:
    """Refuse values outside their valid range, saying what the range is."""
    for name, kind in typing.get_type_hints(Config).items():
        choices = typing.get_args(kind)
        if choices and getattr(cfg, name) not in choices:
            raise ConfigError(
                f"{name.upper()}={getattr(cfg, name)!r} is not one of: {', '.join(choices)}"
            )
    if cfg.lora_r <= 0:
        raise ConfigError(f"LORA_R={cfg.lora_r} must be a positive integer (8, 16, 64 are usual)")
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"LORA_ALPHA={cfg.lora_alpha} must be positive (often 2 x LORA_R)")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"LORA_DROPOUT={cfg.lora_dropout} must be in [0, 1)")
    if cfg.max_length < 8:
        raise ConfigError(f"MAX_LENGTH={cfg.max_length} must be at least 8 tokens")
    if not 0 <= cfg.eval_fraction < 1:
        raise ConfigError(f"EVAL_FRACTION={cfg.eval_fraction} must be in [0, 1)")
    if cfg.max_steps < 0 or (cfg.max_steps == 0 and cfg.epochs <= 0):
        raise ConfigError("set MAX_STEPS > 0, or MAX_STEPS = 0 and EPOCHS > 0")
    if cfg.micro_batch < 0 or cfg.grad_accum < 1:
        raise ConfigError("MICRO_BATCH must be >= 0 (0 = automatic) and GRAD_ACCUM >= 1")
    if cfg.learning_rate < 0:
        raise ConfigError(f"LEARNING_RATE={cfg.learning_rate} must be positive (or 0 = auto)")
    if cfg.memory_budget_gb < 0:
        raise ConfigError("MEMORY_BUDGET_GB must be >= 0 (0 = the card's whole memory)")


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
    manifest.begin_notebook(cfg.run_dir, notebook, cfg.as_parameters())
    return cfg


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
