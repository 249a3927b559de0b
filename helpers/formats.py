"""Dataset sources and formats (notebook 04): local files or Hub datasets, their splits, and the
four formats (text, template, instruction, chat), checked column by column before anything is
tokenized.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from datasets import DatasetDict, get_dataset_split_names, load_dataset


_BATCH = 1000  # rows per batch of datasets' map
EMBEDDED_QUOTES = Path(__file__).parent / "data" / "quotes.jsonl"

# file extension -> the `datasets` builder that reads it
SUPPORTED_EXTENSIONS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
CHAT_ROLES = ("system", "user", "assistant")
EVAL_SPLIT_NAMES = ("validation", "valid", "eval", "test")

# Used when a tokenizer has no chat template of its own. Each assistant turn ends with EOS so that
# the model learns to stop after its answer, not only at the end of the conversation.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)


class DatasetError(ValueError):
    """The data cannot be used as configured; the message says what to change."""


# 1. sources


def load_source(cfg):
    """The rows of ``cfg.dataset`` as a ``datasets.DatasetDict`` (its splits by name).

    ``"embedded"``: the public-domain quotations shipped in ``helpers/data/quotes.jsonl``
    (columns quote, author, tags). A local file: .jsonl/.json (records), .csv, .parquet, or .txt
    (one example per line, column ``text``; blank lines skipped); a single file is one split.
    A local folder or a Hub id: ``datasets.load_dataset(id, DATASET_CONFIG, split=DATASET_SPLIT)``
    plus the source's own validation/test split when it has one. Introduced in notebook 04.
    """
    name = str(cfg.dataset).strip()
    if name in ("", "embedded"):
        if not EMBEDDED_QUOTES.exists():
            raise FileNotFoundError(
                f"the embedded sample {EMBEDDED_QUOTES.name} is missing from the helpers package; "
                "reinstall it (pip install -e .) or set DATASET to a local file")
        return DatasetDict({"train": _load_file(EMBEDDED_QUOTES)})
    path = Path(name).expanduser()
    if path.is_file():
        return DatasetDict({"train": _load_file(path)})
    if path.is_dir():
        return _load_repository(str(path), cfg)
    # a name meant as a file (not a Hub id: ``owner/name``, or a bare ``name``) is a missing file
    suffix = path.suffix.lower()
    file_like = suffix in SUPPORTED_EXTENSIONS or suffix in (
        ".tsv", ".xlsx", ".xls", ".arrow", ".gz", ".zip", ".xml", ".html", ".md", ".yaml")
    if (file_like or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or ("/" not in name and bool(suffix))):
        raise FileNotFoundError(
            f"DATASET={name!r}: no such file or folder ({path.resolve()}); check the path "
            '(relative paths start from the notebook\'s folder), or use DATASET="embedded"')
    return _load_repository(name, cfg)


def _load_file(path: Path):
    builder = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if builder is None:
        raise DatasetError(
            f"{path.name}: files ending in {path.suffix or '(no extension)'} are not supported; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)} (.txt = one example per line)")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path.name} is empty: it has no examples to train on")
    try:
        ds = load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # the builders' own errors name a line but not what to do
        raise DatasetError(_read_error(path, builder, err)) from err
    if builder == "text":
        ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True,
                       keep_in_memory=True)
    return ds


def _read_error(path: Path, builder: str, err: Exception) -> str:
    """What went wrong reading a local file, at its 1-based line where it can be found, with the
    parser's own message."""
    if builder == "json":
        place = _json_fault(path)
        if place:
            return (f"could not read {path.name}: {place}; fix that line (a .jsonl file holds one "
                    "JSON object {...} per line, a .json file a list of objects)")
    causes = [err]  # datasets wraps the parser's error: show the innermost message
    while causes[-1].__cause__ is not None and len(causes) < 10:
        causes.append(causes[-1].__cause__)
    inner = next((c for c in causes[1:] if str(c).strip()), err)
    message = " ".join(str(inner).split())
    return (f"could not read {path.name} as {path.suffix} ({type(inner).__name__}: {message}); "
            "check that the file is valid at the place the message names")


def _json_fault(path: Path) -> str:
    """'line N: <the json module's message>' for the first line of a JSON (lines) file that is
    not a JSON object, or "" when every line parses."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: {e.msg}"
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        return "" if bad is None else f"item {bad + 1} of the list is not a JSON object {{...}}"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}, column {e.colno}: {e.msg}"
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object {{...}}"
    return ""


def row_places(cfg, rows, split: str = "train", notes=None) -> str:
    """Rows of a split (0-based indices) as a reader finds them, 1-based: "lines 3, 8 of
    chat.jsonl" for a .jsonl or .txt file (blank lines skipped as the loader skips them), "rows
    3, 8 of data.csv" (the header not counted) for other files, "rows 3, 8 of the train split of
    owner/name" for a Hub dataset or folder. ``notes`` (one per row) follow each number in
    parentheses. At most five are named."""
    rows = list(rows)
    numbers = [i + 1 for i in rows[:5]]
    name = str(cfg.dataset).strip()
    path = EMBEDDED_QUOTES if name in ("", "embedded") else Path(name).expanduser()
    kind, where = "row", f"the {split} split of {name}"
    if path.is_file():
        kind, where = "row", path.name
        if path.suffix.lower() in (".jsonl", ".txt") or (
                path.suffix.lower() == ".json" and not _starts_with(path, "[")):
            with path.open(encoding="utf-8", errors="replace") as f:
                lines = [n for n, line in enumerate(f, 1) if line.strip()]
            kind, numbers = "line", [lines[i] if i < len(lines) else i + 1 for i in rows[:5]]
    shown = [f"{n} ({note})" if notes else str(n) for n, note in zip(numbers, notes or numbers)]
    more = ", ..." if len(rows) > 5 else ""
    return f"{kind}{'s' if len(rows) > 1 else ''} {', '.join(shown)}{more} of {where}"


def _starts_with(path: Path, char: str) -> bool:
    with path.open(encoding="utf-8", errors="replace") as f:
        return f.read(4096).lstrip().startswith(char)


def public_name(name) -> str:
    """DATASET or MODEL as it may be shown in files people share (model cards, the manifest,
    the dataset's stats): "embedded", rehearsals and Hub ids as they are, a folder of the Hub's
    cache by its id, a local file or folder by its name, never a path of this machine."""
    name = str(name).strip() or "embedded"
    cached = re.search(r"(?:^|[/\\])(?:models|datasets)--([^/\\]+)", name)
    if cached:  # .../hub/models--org--name/snapshots/<commit>
        return cached.group(1).replace("--", "/")
    path = Path(name).expanduser()
    if name == "embedded" or not (path.exists() or path.is_absolute() or name.startswith("~")):
        return name
    return path.name


def _load_repository(name: str, cfg):
    """A Hub dataset id, or a local folder of data files in the same layout."""
    config = cfg.dataset_config or None
    split = cfg.dataset_split or "train"
    local = Path(name).is_dir()
    try:
        available = get_dataset_split_names(name, config)
        base = split.split("[")[0]  # "train[:1000]" reads the first 1000 rows of train
        if base not in available:
            raise DatasetError(
                f"DATASET={name!r} has the splits {', '.join(available)}, not {base!r}; "
                "set DATASET_SPLIT to one of them")
        splits = {split: load_dataset(name, config, split=split)}
        for other in EVAL_SPLIT_NAMES:
            if other in available and other != base:
                splits[other] = load_dataset(name, config, split=other)
                break
    except DatasetError:
        raise
    except ConnectionError as err:
        raise DatasetError(
            f"cannot reach the Hugging Face Hub to load {name!r} ({err}); without network use "
            'DATASET="embedded" or a local file (.jsonl, .json, .csv, .parquet, .txt)') from err
    except Exception as err:
        where = "the folder" if local else "the Hub dataset"
        hint = ("it should hold data files (e.g. train.jsonl, test.jsonl or "
                "data/train-*.parquet)" if local else
                "check the id (owner/name), DATASET_CONFIG and DATASET_SPLIT; a private or gated "
                "dataset needs `huggingface-cli login`")
        raise DatasetError(f"could not load {where} {name!r} ({type(err).__name__}: {err}); "
                           f"{hint}") from err
    return DatasetDict(splits)


def pick_splits(source, cfg):
    """(train, eval or None) from a loaded source, before any random split.

    The train split is ``DATASET_SPLIT`` (or the only split); the eval split is the source's own
    validation/test split when it has one. Both are capped at ``MAX_EXAMPLES`` rows when set.
    """
    # load_source names the split DATASET_SPLIT, or a single file's one split "train"
    train_name = cfg.dataset_split if cfg.dataset_split in source else next(iter(source))
    train = source[train_name]
    evaluation = next((source[n] for n in EVAL_SPLIT_NAMES if n in source and n != train_name),
                      None)
    if cfg.max_examples:
        train = train.select(range(min(cfg.max_examples, len(train))))
        if evaluation is not None:
            evaluation = evaluation.select(range(min(cfg.max_examples, len(evaluation))))
    return train, evaluation


# 2. formats


def instruction_prompt(instruction: str, input: str = "") -> str:
    """The fixed prompt layout of the ``instruction`` format (the response follows it).

    Ends with a newline so that the response starts a new pre-token: generation (notebook 06)
    uses this same function. Introduced in notebook 04.
    """
    text = f"### Instruction:\n{instruction.strip()}\n\n"
    if input and input.strip():
        text += f"### Input:\n{input.strip()}\n\n"
    return text + "### Response:\n"


def required_columns(cfg) -> list:
    """The columns a format reads (``input`` of the instruction format is optional); for the
    template format, the column names its ``{placeholders}`` refer to, in order."""
    fixed = {"text": [cfg.text_column], "instruction": ["instruction", "output"],
             "chat": ["messages"]}
    if cfg.data_format in fixed:
        return fixed[cfg.data_format]
    if cfg.data_format != "template":
        raise DatasetError(f"DATA_FORMAT={cfg.data_format!r}: use text, template, instruction or "
                           "chat")
    template = cfg.template
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise DatasetError(f"TEMPLATE={template!r} is not a valid template ({err}); write column "
                           "names in braces, e.g. '{quote} ({author})', and double literal braces "
                           "{{ }}") from None
    # "{author.name}" and "{tags[0]}" read the columns author and tags
    names = [f.split(".")[0].split("[")[0] for _, f, _, _ in parsed if f is not None]
    if not all(n and not n.isdigit() for n in names):
        raise DatasetError(f"TEMPLATE={template!r} has a placeholder without a column name; "
                           "name a column in each, e.g. {quote}")
    if not names:
        raise DatasetError(f"TEMPLATE={template!r} names no column; use {{column}} placeholders, "
                           "e.g. '{quote} ({author})'")
    return list(dict.fromkeys(names))  # each once, in order


def check_columns(ds, cfg, split: str = "train") -> None:
    """Refuse an empty split, a missing column, or rows whose needed fields are missing."""
    if len(ds) == 0:
        raise DatasetError(f"the {split} split of DATASET={cfg.dataset!r} has no rows; choose a "
                           "source with examples (or a larger MAX_EXAMPLES)")
    columns = list(ds.column_names)
    needed = required_columns(cfg)
    missing = [c for c in needed if c not in columns]
    if missing:
        what = {
            "text": "set TEXT_COLUMN to one of them",
            "template": "use only these names in TEMPLATE's {placeholders}",
            "instruction": "rename your columns to instruction / input (optional) / output, or "
                           "use DATA_FORMAT='template'",
            "chat": "the chat format needs a 'messages' column of [{role, content}, ...]",
        }[cfg.data_format]
        raise DatasetError(f"column {', '.join(map(repr, missing))} not found; the data has the "
                           f"columns {', '.join(columns)}: {what}")
    frame = ds.select_columns(needed).to_pandas()
    for column in needed:
        bad = frame[column].isna()
        if not bad.any() and cfg.data_format in ("text", "instruction"):  # or only spaces
            bad = frame[column].map(lambda v: isinstance(v, str) and not v.strip())
        bad = bad.index[bad].tolist()
        if bad:
            raise DatasetError(
                f"{len(bad)} row(s) of the {split} split have no value in column {column!r}: "
                f"{row_places(cfg, bad, split)}; remove them first, e.g. "
                f"ds.filter(lambda r: r[{column!r}])")
    if cfg.data_format == "chat":
        _check_messages(ds["messages"], cfg, split)


def _check_messages(conversations, cfg, split: str) -> None:
    bad_role, bad_shape = [], []
    for i, messages in enumerate(conversations):
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            bad_shape.append(i)
        elif roles := [(k, m.get("role")) for k, m in enumerate(messages, 1)
                       if m.get("role") not in CHAT_ROLES]:
            bad_role.append((i, *roles[0]))
    if bad_shape:
        raise DatasetError(
            f"{len(bad_shape)} row(s) of the {split} split are not a non-empty list of "
            f"{{role, content}} messages with text content: {row_places(cfg, bad_shape, split)}; "
            "fix or filter them")
    if bad_role:
        places = row_places(cfg, [i for i, _, _ in bad_role], split,
                            [f"message {k}: {r!r}" for _, k, r in bad_role[:5]])
        raise DatasetError(
            f"{len(bad_role)} row(s) of the {split} split have a message role other than "
            f"{', '.join(CHAT_ROLES)}: {places}; map roles to these (ShareGPT's human/gpt are "
            "user/assistant) or filter the rows")


def format_examples(ds, cfg, tokenizer=None):
    """Rows -> ``pieces`` (list of str) and ``trained`` (list of bool, one per piece).

    text: the TEXT_COLUMN; template: TEMPLATE filled with the row; both trained whole.
    instruction: :func:`instruction_prompt` (untrained when RESPONSE_ONLY) + output (trained).
    chat: the tokenizer's chat template (:data:`DEFAULT_CHAT_TEMPLATE` if it has none); with
    RESPONSE_ONLY only assistant turns (their text and end-of-turn marker) are trained.
    The rows must have passed :func:`check_columns`. Introduced in notebook 04.
    """
    kind, only = cfg.data_format, cfg.response_only
    if kind == "chat" and tokenizer is None:
        raise DatasetError("the chat format needs the tokenizer (its chat template)")

    def row_pieces(row):
        if kind == "text":
            return [str(row[cfg.text_column])], [True]
        if kind == "template":
            return [cfg.template.format_map(row)], [True]
        if kind == "instruction":
            prompt = instruction_prompt(row["instruction"], row.get("input") or "")
            return [prompt, str(row["output"])], [not only, True]
        return chat_pieces(row["messages"], tokenizer, only)

    def fn(batch):
        out = [row_pieces(dict(zip(batch, values))) for values in zip(*batch.values())]
        return {"pieces": [p for p, _ in out], "trained": [t for _, t in out]}

    return ds.map(fn, batched=True, batch_size=_BATCH, remove_columns=ds.column_names,
                  keep_in_memory=True, desc="format")


def chat_pieces(messages, tokenizer, response_only: bool = True):
    """A conversation rendered with the chat template, cut into (pieces, trained).

    Each assistant turn is located by rendering the conversation up to it with the generation
    prompt (the assistant header) and up to its end; the text between is that turn's trained
    piece. Works for any template that renders a conversation's beginning the same way whether or
    not more turns follow (the usual case); others are refused with a clear error.
    """
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE

    def render(msgs, generation=False):
        if not msgs and not generation:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=template,
                                             add_generation_prompt=generation)

    full = render(messages)
    if not response_only:
        return [full], [True]
    pieces, trained, done = [], [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], generation=True), render(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through) and len(before) >= done):
            raise DatasetError(
                "this tokenizer's chat template renders the start of a conversation differently "
                "when more turns follow, so assistant turns cannot be located for response-only "
                "loss; set RESPONSE_ONLY=False, or give the tokenizer a simpler chat_template")
        if len(before) > done:
            pieces.append(before[done:])
            trained.append(False)
        pieces.append(through[len(before):])
        trained.append(True)
        done = len(through)
    if done < len(full):
        pieces.append(full[done:])
        trained.append(False)
    return pieces, trained
