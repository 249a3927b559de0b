"""Dataset preparation: from a source to token ids with labels a causal LM can learn from.

Introduced in notebook 04 (dataset preparation); notebook 05 calls :func:`load_or_prepare` and
trains with :class:`CompletionCollator`. The steps, each a function the notebook shows:

1. :func:`load_source` - the embedded quotes, a local file (.jsonl .json .csv .parquet .txt), a
   local folder laid out like a Hub dataset, or a Hub dataset id (``DATASET_CONFIG``,
   ``DATASET_SPLIT``).
2. :func:`format_examples` - every row becomes ``pieces`` of text and, for each piece, whether it
   is ``trained`` (counts for the loss): one piece for ``text`` and ``template``; a prompt and a
   response for ``instruction``; the turns of a ``chat`` rendered with the tokenizer's chat
   template, assistant turns trained.
3. :func:`tokenize_examples` - token ids and labels. Every complete example ends with EOS, and EOS
   keeps its label: the original recipe padded with EOS and let ``DataCollatorForLanguageModeling``
   turn every pad-id label into -100, so the EOS labels vanished too and the tuned model never
   learned to stop. Here labels are built explicitly and padding is masked by position (see
   :class:`CompletionCollator`), never by comparing ids with the pad id.
4. :func:`pack` (``PACKING``) - whole examples laid end to end in blocks of at most MAX_LENGTH.
5. :func:`prepare` runs it all with a seeded train/eval split; :func:`save` writes
   ``RUN_DIR/dataset`` and ``RUN_DIR/dataset_stats.json``; :func:`load_or_prepare` reuses them only
   when they were prepared with the same tokenizer and settings (a fingerprint), else rebuilds.

Prompt and response pieces are tokenized separately and their ids concatenated, so no BPE merge
can straddle the boundary: the prompt's tokens are exactly those the model sees at generation time
(when the prompt is tokenized alone), and every response token, EOS included, has its label.
"""

from __future__ import annotations

import bisect
import hashlib
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import pandas as pd
import torch
from datasets import DatasetDict, load_from_disk
from transformers import DataCollatorForSeq2Seq

from helpers import rundir
from helpers.formats import (_BATCH, DEFAULT_CHAT_TEMPLATE, EMBEDDED_QUOTES, DatasetError,
                             check_columns, public_name, format_examples,
                             instruction_prompt, load_source, pick_splits)
from helpers.tokens import IGNORE_INDEX


FORMAT_VERSION = 1  # part of the fingerprint: bump when the prepared layout changes


# 3. tokens and labels


def tokenize_examples(formatted, tokenizer, max_length: int, response_only: bool = True,
                      add_leading_special: bool = True):
    """``pieces``/``trained`` -> ``input_ids`` and ``labels`` (plus per-example bookkeeping).

    Labels are the ids of trained pieces and -100 elsewhere (all ids when not RESPONSE_ONLY).
    EOS is appended (unless the text already ends with it) and keeps its label (unless the
    example ends with an untrained piece, e.g. a chat ending with a user turn). An example longer
    than ``max_length`` keeps its first ``max_length`` tokens and no EOS: it did not end there,
    and an EOS would teach the model to stop mid-sentence. Added columns: ``full_length`` (tokens
    before truncation, EOS included), ``loss_tokens`` (labels the loss uses:
    those after the first position, which a causal LM never predicts). Introduced in notebook 04.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DatasetError("the tokenizer has no EOS token; set tokenizer.eos_token (the model "
                           "must learn where an example ends)")
    lead = []  # the ids the tokenizer puts before every text by itself (BOS for Llama's)
    if add_leading_special:
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full, n = tokenizer("a")["input_ids"], len(plain)
        lead = full[:next((k for k in range(len(full) - n + 1) if full[k: k + n] == plain), 0)]

    def fn(batch):
        flat = [p for pieces in batch["pieces"] for p in pieces]
        flat_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        out = {"input_ids": [], "labels": [], "full_length": [], "loss_tokens": []}
        for trained in batch["trained"]:
            ids, labels = list(lead), [IGNORE_INDEX] * len(lead)
            for t in trained:
                piece = next(flat_ids)
                ids.extend(piece)
                labels.extend(piece if (t or not response_only) else [IGNORE_INDEX] * len(piece))
            if not ids or ids[-1] != eos:
                ids.append(eos)  # its label follows the last piece: a trained end is learned
                labels.append(eos if (not response_only or not trained or trained[-1])
                              else IGNORE_INDEX)
            n = len(ids)
            if n > max_length:
                ids, labels = ids[:max_length], labels[:max_length]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["full_length"].append(n)
            out["loss_tokens"].append(len(labels) - 1 - labels[1:].count(IGNORE_INDEX))
        return out

    return formatted.map(fn, batched=True, batch_size=_BATCH,
                         remove_columns=formatted.column_names, keep_in_memory=True,
                         desc="tokenize")


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Blocks of example indices, no block over ``capacity`` tokens: the longest example first,
    each into the fullest block it still fits (a new block where none has room). For examples much
    shorter than a block this leaves almost no tail to pad, where laying them end to end in order
    leaves on average half an example per block."""
    blocks, free = [], []  # free: sorted (room left, block)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            blocks.append([i])
            bisect.insort(free, (capacity - n, len(blocks) - 1))
        else:
            room, b = free.pop(k)
            blocks[b].append(i)
            bisect.insort(free, (room - n, b))
    return blocks


def pack(tokenized, max_length: int):
    """Whole examples packed into blocks of at most ``max_length`` tokens.

    Within batches of 1,000 examples, :func:`best_fit_decreasing` decides which examples share a
    block, so the blocks are nearly full (the embedded quotes at 512 tokens: 72 blocks, 98.1%
    real tokens, one block over the least their tokens need; laid end to end in order: 74,
    95.5%). No example is split and no token is dropped (a block's unused tail is padding the
    collator adds, never counted). Each example keeps its own EOS.

    ``position_ids`` restart at 0 for every example, and each example's first label is -100 (as
    unpacked, where a first token is never predicted), so the loss covers exactly the same tokens
    packed or not. Whether examples in one block can attend to each other depends on the batch:
    :class:`CompletionCollator` leaves out ``attention_mask`` for packed rows, and transformers
    (>= 4.54, eager/SDPA/flash attention) then builds a causal mask per example from the
    restarting ``position_ids`` (or :mod:`helpers.attention` gives each example its own attention
    without a mask): no attention across examples, logits equal to unpacked ones. Older versions
    or other models fall back to one causal mask over the block (examples see the ones before
    them, the usual packing compromise). Introduced in notebook 04.
    """

    def fn(batch):
        out = {"input_ids": [], "labels": [], "position_ids": []}
        ids, labels = batch["input_ids"], batch["labels"]
        for block in best_fit_decreasing([len(x) for x in ids], max_length):
            out["input_ids"].append([t for i in block for t in ids[i]])
            out["labels"].append([t for i in block for t in [IGNORE_INDEX] + labels[i][1:]])
            out["position_ids"].append([p for i in block for p in range(len(ids[i]))])
        return out

    return tokenized.map(fn, batched=True, batch_size=_BATCH,
                         remove_columns=tokenized.column_names, keep_in_memory=True, desc="pack")


# 4. the whole preparation, saved and reused


@dataclass
class Prepared:
    """A prepared dataset: ``train``/``eval`` (``eval`` may be None), figures, fingerprint.

    Rows hold ``input_ids`` and ``labels`` (and ``position_ids`` when packed), unpadded;
    :class:`CompletionCollator` pads them per batch. ``lengths`` are the train examples' token
    counts before truncation (None when reloaded from disk).
    """

    train: object
    eval: object
    stats: dict
    lengths: list | None = None
    origin: str = "prepared"

    def metrics(self) -> dict:
        """The figures notebook 04 records in the manifest (all numbers; see :func:`prepare`)."""
        return dict(self.stats["figures"])

    def __repr__(self) -> str:
        f = self.stats["figures"]
        packed = f" in {f['train_rows']:,} packed blocks" if f["packing"] else ""
        return (f"Prepared({self.stats['source']}: {f['train_examples']:,} train examples{packed}, "
                f"{f['eval_examples']:,} eval; {f['train_tokens']:,} train tokens, "
                f"{f['train_loss_tokens']:,} in the loss; {f['truncated_examples']:,} truncated "
                f"at MAX_LENGTH={f['max_length']}; {self.origin})")


def _source_identity(cfg) -> dict:
    """What identifies the source's content: file sizes and times for local data, else the id."""
    name = str(cfg.dataset).strip()
    path = EMBEDDED_QUOTES if name in ("", "embedded") else Path(name).expanduser()
    if not path.exists():
        return {"hub": name}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    root = path.parent if path.is_file() else path
    return {"files": [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
                      for p in files]}


def _tokenizer_identity(tokenizer, with_chat_template: bool) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
    else:  # a slow tokenizer: its vocabulary
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        digest = hashlib.sha256(vocab.encode()).hexdigest()[:16]
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    out = {"name": public_name(name) if name else "", "size": len(tokenizer),
           "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "digest": digest}
    if with_chat_template:
        out["chat_template"] = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return out


def settings(cfg, tokenizer) -> dict:
    """Everything the prepared dataset depends on (the fingerprint is a hash of this)."""
    s = {"format_version": FORMAT_VERSION, "dataset": public_name(cfg.dataset),
         "source": _source_identity(cfg), "data_format": cfg.data_format,
         "response_only": cfg.response_only, "max_length": cfg.max_length,
         "packing": cfg.packing, "eval_fraction": cfg.eval_fraction,
         "max_examples": cfg.max_examples, "seed": cfg.seed,
         "tokenizer": _tokenizer_identity(tokenizer, cfg.data_format == "chat")}
    if cfg.dataset not in ("", "embedded") and not Path(cfg.dataset).expanduser().is_file():
        s.update(dataset_config=cfg.dataset_config, dataset_split=cfg.dataset_split)
    if cfg.data_format == "text":
        s["text_column"] = cfg.text_column
    if cfg.data_format == "template":
        s["template"] = cfg.template
    return s


def fingerprint(cfg, tokenizer) -> str:
    """A short hash of :func:`settings`: equal fingerprints, interchangeable datasets."""
    blob = json.dumps(settings(cfg, tokenizer), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_rows(cfg) -> tuple:
    """(train rows, held-out rows or None, whether the held-out rows are the source's own split):
    the rows checked (:func:`helpers.formats.check_columns`) and, without an eval split of the
    source's own, EVAL_FRACTION of them held out by a split seeded with SEED. The same rows every
    time for the same settings: :func:`prepare` trains on them and :func:`held_out_examples`
    takes its prompts from them."""
    train_rows, eval_rows = pick_splits(load_source(cfg), cfg)
    check_columns(train_rows, cfg, "train")
    own_eval = eval_rows is not None  # the source's own eval split is kept
    if own_eval:
        check_columns(eval_rows, cfg, "eval")
    elif cfg.eval_fraction > 0 and len(train_rows) >= 2:  # hold out EVAL_FRACTION (seeded)
        n_eval = min(len(train_rows) - 1, max(1, round(cfg.eval_fraction * len(train_rows))))
        parts = train_rows.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        train_rows, eval_rows = parts["train"], parts["test"]
    return train_rows, eval_rows, own_eval


def prepare(cfg, tokenizer) -> Prepared:
    """Source -> formatted -> tokenized (labels, EOS, truncation) -> optional packing, per split.

    Figures (``Prepared.metrics()``, train split unless named ``eval_``):
    train_examples / eval_examples (examples, before packing); train_rows (rows the Trainer sees:
    blocks when packed); train_tokens / eval_tokens (real tokens: every non-pad id, EOS included,
    after truncation); train_loss_tokens / eval_loss_tokens (tokens the loss is computed on:
    labels other than -100, a row's first position excluded); truncated_examples and
    truncated_tokens (examples longer than MAX_LENGTH and the tokens cut from them);
    dropped_examples (examples left without any loss token by truncation, removed);
    packing_dropped_tokens (always 0: packing pads, never drops); mean/median/p95/max/min_tokens
    (per example before truncation, EOS included); max_length; packing (0/1).
    Introduced in notebook 04.
    """
    started = time.perf_counter()
    train_rows, eval_rows, own_eval = split_rows(cfg)

    def build(rows):
        """Format and tokenize; drop the examples left without a loss token; pack (PACKING)."""
        formatted = format_examples(rows, cfg, tokenizer)  # checked above
        tok = tokenize_examples(formatted, tokenizer, cfg.max_length, cfg.response_only,
                                add_leading_special=cfg.data_format != "chat")
        counts = tok.select_columns(["full_length", "loss_tokens"]).with_format("numpy")[:]
        lengths, loss = counts["full_length"], counts["loss_tokens"]
        keep = loss > 0
        if not keep.all():
            tok = tok.select(np.flatnonzero(keep), keep_in_memory=True)
        tok = tok.remove_columns(["full_length", "loss_tokens"])
        if cfg.packing:  # the same tokens and loss tokens, in fewer rows
            tok = pack(tok, cfg.max_length)
        return tok, lengths, {  # tokens: after truncation, of the examples kept
            "examples": int(keep.sum()), "dropped": int((~keep).sum()),
            "tokens": int(np.minimum(lengths[keep], cfg.max_length).sum()),
            "loss_tokens": int(loss.sum())}

    train_ds, lengths, train = build(train_rows)
    if train["examples"] == 0:
        raise DatasetError(f"no train example has a token left for the loss at MAX_LENGTH="
                           f"{cfg.max_length} (prompts fill it); raise MAX_LENGTH or shorten the "
                           "prompts")
    no_eval = None, None, dict.fromkeys(("examples", "dropped", "tokens", "loss_tokens"), 0)
    eval_ds, _, ev = build(eval_rows) if eval_rows is not None and len(eval_rows) else no_eval
    truncated = lengths > cfg.max_length
    ls = pd.Series(lengths).describe(percentiles=[0.5, 0.95])  # per example, before truncation
    figures = {
        "train_examples": train["examples"], "eval_examples": ev["examples"],
        "train_rows": len(train_ds), "train_tokens": train["tokens"],
        "train_loss_tokens": train["loss_tokens"],
        "eval_tokens": ev["tokens"], "eval_loss_tokens": ev["loss_tokens"],
        "truncated_examples": int(truncated.sum()),
        "truncated_tokens": int((lengths[truncated] - cfg.max_length).sum()),
        "dropped_examples": train["dropped"],
        "packing_dropped_tokens": 0,
        "mean_tokens": round(float(ls["mean"]), 2), "median_tokens": float(ls["50%"]),
        "p95_tokens": round(float(ls["95%"]), 2), "max_tokens": int(ls["max"]),
        "min_tokens": int(ls["min"]),
        "max_length": cfg.max_length, "packing": int(cfg.packing),
        "prepare_seconds": round(time.perf_counter() - started, 2),
    }
    stats = {"fingerprint": fingerprint(cfg, tokenizer), "settings": settings(cfg, tokenizer),
             "source": "embedded quotes" if cfg.dataset in ("", "embedded") else
             public_name(cfg.dataset),
             "eval_from": "source split" if own_eval else f"{cfg.eval_fraction:.0%} of train",
             "eval_dropped_examples": ev["dropped"],
             "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "figures": figures}
    return Prepared(train_ds, eval_ds, stats, lengths=lengths.tolist())


DATASET_DIR = "dataset"
STATS_FILE = "dataset_stats.json"


def save(prepared: Prepared, run_dir) -> Path:
    """Write ``RUN_DIR/dataset`` (a DatasetDict: train, eval) and ``RUN_DIR/dataset_stats.json``.

    The dataset is written beside the earlier one and swapped in whole
    (:func:`helpers.rundir.replace_folder`), and the stats file, which vouches for it, is
    removed only then and written last (atomically): a save cut short leaves the earlier dataset
    usable, or none, which is rebuilt, never a mix. Introduced in notebook 04; read by
    :func:`load_or_prepare` in notebook 05.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target, stats_path = run_dir / DATASET_DIR, run_dir / STATS_FILE
    splits = {"train": prepared.train, "eval": prepared.eval}
    tmp = rundir.partial_folder(target)
    DatasetDict({k: v for k, v in splits.items() if v is not None}).save_to_disk(str(tmp))
    stats_path.unlink(missing_ok=True)
    rundir.replace_folder(tmp, target)
    rundir.write_text(stats_path, json.dumps(prepared.stats, indent=1, default=str) + "\n")
    return target


def _differences(old: dict, new: dict, prefix: str = "") -> list:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            shown = [v if len(repr(v)) < 40 else "(changed)" for v in (a, b)]
            out.append(f"{prefix}{key}: {shown[0]!r} -> {shown[1]!r}")
    return out


def load_or_prepare(cfg, tokenizer, run_dir=None, verbose: bool = True) -> Prepared:
    """The dataset notebook 04 saved in RUN_DIR, or a fresh one when it is missing or stale.

    A saved dataset is reused only when its fingerprint matches this tokenizer and these settings
    (format, MAX_LENGTH, packing, source, ...); otherwise it is rebuilt and saved, and the
    differences are printed. Introduced in notebook 05.
    """
    run_dir = Path(run_dir or cfg.run_dir)
    target, stats_path = run_dir / DATASET_DIR, run_dir / STATS_FILE
    say = print if verbose else (lambda *_: None)
    wanted = fingerprint(cfg, tokenizer)
    reason, origin = f"no prepared dataset in {run_dir.name}/", "prepared"
    if target.is_dir() and stats_path.exists():
        try:
            stats = json.loads(stats_path.read_text())
        except json.JSONDecodeError:
            stats = {}
        if stats.get("fingerprint") == wanted:
            say(f"Reusing the dataset prepared in {run_dir.name}/{DATASET_DIR} "
                f"(fingerprint {wanted}).")
            splits = load_from_disk(str(target))
            return Prepared(splits["train"], splits.get("eval"), stats, origin="reused")
        changes = _differences(stats.get("settings", {}), settings(cfg, tokenizer))
        reason = ("the saved dataset was prepared differently: " + "; ".join(changes[:5])
                  if changes else "the saved dataset's fingerprint does not match")
        origin = f"rebuilt: {reason}"
    say(f"Preparing the dataset: {reason}.")
    prepared = prepare(cfg, tokenizer)
    prepared.origin = origin
    save(prepared, run_dir)
    return prepared


# 5. batches


class CompletionCollator(DataCollatorForSeq2Seq):
    """transformers' ``DataCollatorForSeq2Seq`` for a causal LM, plus packed rows.

    Rows are padded on the right to the longest in the batch (rounded up to
    ``pad_to_multiple_of``): ``input_ids`` with the pad id, ``attention_mask`` 0, ``labels``
    -100. Padding is masked by position, never by comparing ids with the pad id, so an EOS inside
    a sequence keeps its label even when a tokenizer's pad id equals its EOS id.

    What it adds for packed rows (with ``position_ids``, see :func:`pack`), which the library
    collator cannot pad: ``position_ids`` padded with 0, no ``attention_mask`` and
    ``use_cache=False``, so that transformers builds one causal mask per packed example from the
    restarting ``position_ids``; right padding needs no mask in a causal model, since no real
    token attends to a later position. ``DataCollatorWithFlattening`` does not fit: it joins the
    whole batch into one row, where the series packs rows of at most MAX_LENGTH that the memory
    budget (notebook 05) counts. Introduced in notebook 04; the Trainer of notebook 05 uses it.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        if tokenizer.pad_token_id is None:
            raise DatasetError("the tokenizer has no pad token: load it with "
                               "helpers.loading.load_tokenizer, which adds one")
        if tokenizer.padding_side != "right":
            raise DatasetError("training batches are padded on the right; set "
                               "tokenizer.padding_side = 'right' (or load_tokenizer(model))")
        super().__init__(tokenizer, pad_to_multiple_of=pad_to_multiple_of,
                         label_pad_token_id=IGNORE_INDEX)

    def __call__(self, features: list) -> dict:
        positions = [f["position_ids"] for f in features] if "position_ids" in features[0] else None
        batch = dict(super().__call__([{"input_ids": f["input_ids"],
                                        "labels": f.get("labels", f["input_ids"])}
                                       for f in features]))
        if positions is not None:
            batch["position_ids"] = torch.zeros_like(batch["input_ids"])
            for i, p in enumerate(positions):
                batch["position_ids"][i, :len(p)] = torch.as_tensor(p)
            del batch["attention_mask"]
            batch["use_cache"] = False  # the per-example mask is only built without a cache
        return batch


# 6. showing examples


class TokenView:
    """Examples as tokens, loss tokens highlighted: HTML in a notebook, text elsewhere."""

    def __init__(self, html_text: str, plain_text: str):
        self.html, self.text = html_text, plain_text

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


def render_examples(prepared, tokenizer, n: int = 3, split: str = "train") -> TokenView:
    """The first ``n`` rows of a split, token by token, showing what the loss sees.

    Tokens that count for the loss are highlighted (in text: ``[in brackets]``); the others are
    context only. EOS is shown by name, newlines as ``↵``, and in packed rows ``‖`` marks where
    the next example starts. Introduced in notebook 04.
    """
    ds = prepared.train if split == "train" else prepared.eval
    if ds is None:
        raise DatasetError(f"there is no {split} split to show (EVAL_FRACTION = 0?)")
    eos, special = tokenizer.eos_token_id, set(getattr(tokenizer, "all_special_ids", []))
    legend = ("<div style='margin-bottom:6px'><span style='background:#b7ebb4;padding:1px 4px'>"
              "counts for the loss</span> <span style='color:#777;background:#f0f0f0;"
              "padding:1px 4px'>context only</span> <span style='color:#b00;font-weight:bold'>"
              "EOS</span> ↵ newline, ‖ next packed example</div>")
    blocks, texts = [legend], ["[brackets] = counts for the loss; ↵ = newline"]
    for r in range(min(n, len(ds))):
        row = ds[r]
        ids, labels, positions = row["input_ids"], row["labels"], row.get("position_ids")
        counted = sum(1 for i, y in enumerate(labels) if i > 0 and y != IGNORE_INDEX)
        what = f"example {r + 1}" if positions is None else \
            f"row {r + 1} ({list(positions).count(0)} packed examples)"
        head = f"{what}: {len(ids)} tokens, {counted} in the loss"
        spans, plain = [], []
        tokens = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)  # one at a time
        for i, (t, y, text) in enumerate(zip(ids, labels, tokens)):
            if positions is not None and i > 0 and positions[i] == 0:
                spans.append("<span style='color:#06c;font-weight:bold'>‖</span>")
                plain.append("‖")
            shown = text.replace("\n", "↵\n") if t not in special else text
            style = "background:#b7ebb4" if y != IGNORE_INDEX else "color:#777;background:#f0f0f0"
            if t == eos:
                style += ";color:#b00;font-weight:bold"
            spans.append(f"<span style='{style};border-right:1px solid #fff'>"
                         f"{html.escape(shown)}</span>")
            plain.append(f"[{shown}]" if y != IGNORE_INDEX else shown)
        blocks.append(f"<div style='margin:8px 0'><b>{head}</b><div style='font-family:monospace;"
                      f"white-space:pre-wrap;line-height:1.8'>{''.join(spans)}</div></div>")
        texts.append(f"--- {head}\n{''.join(plain)}")
    return TokenView("".join(blocks), "\n".join(texts))


# 7. held-out examples: prompts and references for generation


def held_out_examples(cfg, tokenizer=None, n: int = 16, split: str = "held-out") -> list:
    """``(prompt, reference)`` pairs from the first ``n`` held-out rows (the rows
    :func:`split_rows` holds out of training), the prompt laid out exactly as training lays the
    example out, the reference what the model should write after it.

    instruction: :func:`helpers.formats.instruction_prompt` and the row's output. chat: the
    conversation up to its last assistant turn, rendered with the chat template and the assistant
    header (:func:`helpers.formats.chat_pieces`, so the tokenizer is needed), and that turn's
    content. template and text: the example's opening (the template's text before its first
    placeholder and the first two words of that value) and the rest of the example. Without
    held-out rows (EVAL_FRACTION=0 and no eval split of the source) the first train rows serve:
    the model has seen those. ``split="train"``: the same from the first train rows instead.
    Introduced in notebook 05.
    """
    train_rows, eval_rows, _ = split_rows(cfg)
    held_out = split != "train" and eval_rows is not None and len(eval_rows)
    rows = eval_rows if held_out else train_rows
    rows = rows.select(range(min(n, len(rows))))
    if cfg.data_format == "chat" and tokenizer is None:
        raise DatasetError("chat prompts are rendered with the tokenizer's chat template: pass "
                           "the tokenizer")
    out = []
    for row in rows:
        if cfg.data_format == "instruction":
            out.append((instruction_prompt(row["instruction"], row.get("input") or ""),
                        str(row["output"])))
        elif cfg.data_format == "chat":
            turns = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
            if turns:
                prompt = _generation_prompt(row["messages"][:turns[-1]], tokenizer)
                out.append((prompt, row["messages"][turns[-1]]["content"]))
        else:
            full, prompt = _opening(row, cfg)
            out.append((prompt, full[len(prompt):]))
    return out


def _generation_prompt(messages, tokenizer) -> str:
    """The conversation so far, rendered with the assistant header, as :func:`chat_pieces`
    renders the text before an assistant turn in training."""
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(list(messages), tokenize=False, chat_template=template,
                                         add_generation_prompt=True)


def _opening(row, cfg) -> tuple:
    """(the example's whole text, its opening) for the template and text formats."""
    import re
    import string

    if cfg.data_format == "text":
        full, lead, value = str(row[cfg.text_column]), "", str(row[cfg.text_column])
    else:
        full = cfg.template.format_map(row)
        lead, field, spec, conv = next(
            (part for part in string.Formatter().parse(cfg.template) if part[1] is not None))
        value = string.Formatter().vformat(
            "{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}",
            (), row)
    words = 2 if len(value.split()) >= 3 else 1
    opening = re.match(r"\s*\S+" + r"(?:\s+\S+)?" * (words - 1), value)
    prompt = lead + (opening.group(0) if opening else "")
    return full, prompt if full.startswith(prompt) else lead
