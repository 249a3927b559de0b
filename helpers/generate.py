"""Generation (notebooks 02, 05 and 06).

Notebook 05 shows what the model writes before and after training: :func:`generate` (greedy and
deterministic by default, batched with left padding, stopping at EOS, and telling whether each
text ended with EOS), :func:`default_prompts` (held-out examples of the dataset, or PROMPTS,
laid out as training lays them out), :func:`base_and_tuned` (the base's outputs come from the
same peft model with its adapter switched off, so no second copy of the base is held),
:func:`side_by_side` (a pandas table) and :func:`score`: how many outputs are in the dataset's
form (:class:`FormCheck`) and how close they come to the held-out references (exact match,
token F1). Notebook 06 generates with the loaded adapter (greedy, sampled, streamed); the adapter
check is :mod:`helpers.adapters`, the verified merge :mod:`helpers.merge`.
"""

from __future__ import annotations

import contextlib
import re
import string
from dataclasses import dataclass

import torch


class Generations(list):
    """The generated texts (a list of str), with what happened to each.

    ``ends_with_eos[i]``: generation i stopped because the model wrote EOS (within
    ``max_new_tokens``), rather than running out of tokens; ``new_tokens[i]``: how many tokens it
    wrote before stopping (EOS not counted); ``prompts``: the prompts, in order; ``token_ids[i]``:
    the ids it wrote (special tokens included, which the texts leave out).
    """

    def __init__(self, texts, ends_with_eos, new_tokens, prompts, token_ids=None):
        super().__init__(texts)
        self.ends_with_eos = list(ends_with_eos)
        self.new_tokens = list(new_tokens)
        self.prompts = list(prompts)
        self.token_ids = list(token_ids) if token_ids is not None else None

    @property
    def eos_rate(self) -> float:
        """The fraction of generations that stopped by EOS."""
        return sum(self.ends_with_eos) / len(self) if len(self) else 0.0


def _stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and any the model's generation config
    names (chat models often stop at an end-of-turn token too)."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    ids = [int(i) for i in [tokenizer.eos_token_id, *extra] if i is not None]
    ids = list(dict.fromkeys(ids))  # each once, the tokenizer's first
    if not ids:
        raise ValueError("the tokenizer has no EOS token, so generation cannot stop by itself; "
                         "set tokenizer.eos_token (helpers.models gives every tokenizer one)")
    return ids


@contextlib.contextmanager
def _generation_mode(model, tokenizer):
    """Eval mode, CPU-safe 4-bit layers, left padding and a pad token; all restored afterwards."""
    was_training = model.training
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    if model.device.type == "cpu":
        from helpers.models import cpu_safe

        cpu_safe(model)
    model.eval()
    tokenizer.padding_side = "left"  # new tokens follow the prompt directly in every row
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token  # masked out; only for the batch's shape
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
        if was_training:
            model.train()


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 40, do_sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, repetition_penalty: float = 1.0,
             seed: int = 0, stream: bool = False, batch_size: int = 8) -> Generations:
    """The text the model writes after each prompt (the prompt itself not included).

    Greedy by default, so the same model and prompts give the same texts every time; with
    ``do_sample=True``, nucleus sampling (``temperature``, ``top_p``; no top-k cut) seeded by
    ``seed`` without disturbing the caller's random state. Prompts run in batches of
    ``batch_size`` padded on the left (a causal model continues from the last position, so padding
    must not sit between prompt and continuation); the tokenizer's padding side is restored.
    Each text ends at the first EOS; ``result.ends_with_eos`` says which ones stopped that way,
    the evidence that fine-tuning taught the model to stop. ``stream=True`` prints each text as
    it is produced (one prompt at a time). The model is put in eval mode (and back in train mode
    afterwards if it was). transformers refuses values out of range (``temperature`` <= 0 when
    sampling, ``max_new_tokens`` < 1, ...) with its own message. Introduced in notebook 05.
    """
    from transformers import TextStreamer

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
               "repetition_penalty": repetition_penalty, "eos_token_id": stop,
               "pad_token_id": pad if pad is not None else stop[0]}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    device = model.device
    step = 1 if stream else max(1, int(batch_size))
    texts, ends, counts, written = [], [], [], []
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with _generation_mode(model, tokenizer), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            # a prompt that starts with BOS (a chat template writes it) gets no second one
            bos = getattr(tokenizer, "bos_token", None)
            special = not (bos and bos != tokenizer.eos_token
                           and all(p.startswith(bos) for p in chunk))
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=special).to(device)
            streamer = None
            if stream:
                print(chunk[0], end="", flush=True)
                streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            with torch.no_grad():
                out = model.generate(**enc, **options, streamer=streamer)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stop), None)
                kept = row if cut is None else row[:cut]
                texts.append(tokenizer.decode(kept, skip_special_tokens=True))
                ends.append(cut is not None)
                counts.append(len(kept))
                written.append(kept)
    return Generations(texts, ends, counts, prompts, written)


class Prompts(list):
    """Prompts laid out in the dataset's format (a list of str), with ``references``: what each
    held-out example goes on with (None for prompts given in PROMPTS)."""

    def __init__(self, prompts, references=None):
        super().__init__(prompts)
        self.references = list(references) if references is not None else None


def _chat_template(tokenizer):
    from helpers.formats import DEFAULT_CHAT_TEMPLATE

    return None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE


def _render_chat(tokenizer, messages, generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                         chat_template=_chat_template(tokenizer))


def layout_prompt(cfg, text: str, tokenizer=None) -> str:
    """One prompt of PROMPTS laid out as training lays the dataset's examples out.

    text: as it is. template: after the template's text before its first placeholder (unless it
    starts with it). instruction: :func:`helpers.formats.instruction_prompt`; chat: a user turn
    rendered with the chat template and the assistant header (needs the tokenizer). A prompt
    already laid out by hand (ending with the layout's response header, "### Response:" or the
    chat template's) is kept, with the header's closing newline restored: a prompt that stops
    short of it is not what the model was trained on, and it answers "". Introduced in notebook
    05.
    """
    kind = cfg.data_format
    if kind == "text":
        return text
    if kind == "template":
        lead = next(iter(string.Formatter().parse(cfg.template)), ("",))[0]
        return text if text.startswith(lead) else lead + text
    if kind == "instruction":
        from helpers.formats import instruction_prompt

        layout = instruction_prompt("x")
    elif kind == "chat":
        if tokenizer is None:
            raise ValueError("chat prompts are rendered with the tokenizer's chat template: "
                             "call default_prompts(cfg, tokenizer)")
        layout = _render_chat(tokenizer, [{"role": "user", "content": "x"}], True)
    else:
        raise ValueError(f"DATA_FORMAT={kind!r}: use text, template, instruction or chat")
    header = layout[layout.rindex("x") + 1:]  # what follows the content: the response header
    if header.strip() and text.rstrip().endswith(header.strip()):  # laid out by hand
        return text.rstrip() + header[len(header.rstrip()):]
    if kind == "instruction":
        from helpers.formats import instruction_prompt

        return instruction_prompt(text)
    return _render_chat(tokenizer, [{"role": "user", "content": text}], True)


def default_prompts(cfg, tokenizer=None, n: int = 16) -> Prompts:
    """Prompts in the dataset's format, laid out exactly as in training.

    Without PROMPTS: the first ``n`` held-out examples of the dataset
    (:func:`helpers.data.held_out_examples`: an instruction in its layout, a conversation up to
    its last assistant turn, the opening of a text), with what each example goes on with as
    ``references``. With PROMPTS ("|"-separated): each laid out by :func:`layout_prompt`, no
    references (a "|" inside a marker like ``<|user|>`` separates nothing). Chat prompts need the
    tokenizer. Introduced in notebook 05.
    """
    # "|" separates prompts, except inside a marker such as <|user|>
    given = re.split(r"(?<!<)\|(?!>)", getattr(cfg, "prompts", "") or "")
    given = [p.lstrip().rstrip(" \t") for p in given]
    given = [p for p in given if p.strip()]
    if given:
        return Prompts([layout_prompt(cfg, p, tokenizer) for p in given])
    from helpers.data import held_out_examples

    if cfg.data_format == "chat" and tokenizer is None:
        raise ValueError("chat prompts are rendered with the tokenizer's chat template: "
                         "call default_prompts(cfg, tokenizer)")
    pairs = held_out_examples(cfg, tokenizer, n)
    return Prompts([p for p, _ in pairs], [r for _, r in pairs])


def base_and_tuned(model, tokenizer, prompts, **options) -> tuple[Generations, Generations]:
    """(base outputs, tuned outputs) from one peft model: the base's come from the same model
    inside ``model.disable_adapter()``, so no second copy of the base is ever loaded. ``options``
    as for :func:`generate`. Introduced in notebook 05."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"{type(model).__name__} has no adapter to switch off: pass the peft "
                        "model (from helpers.lora.attach or PeftModel.from_pretrained)")
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, **options)
    tuned = generate(model, tokenizer, prompts, **options)
    return base, tuned


def side_by_side(prompts, base_outputs, tuned_outputs, titles=("base", "tuned")):
    """Base and tuned outputs per prompt, as a pandas DataFrame: a table in a notebook,
    ``.to_string()`` in a log. An output that stopped by EOS is marked "[EOS]", one cut by
    max_new_tokens "[...]" (when the outputs come from :func:`generate`); a line break inside an
    output shows as a return sign, so each output stays on one line. Introduced in notebook 05.
    """
    import pandas as pd

    if not len(prompts) == len(base_outputs) == len(tuned_outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(base_outputs)} and "
                         f"{len(tuned_outputs)} outputs: give one output per prompt to each side")
    table = {"prompt": list(prompts)}
    for title, outputs in zip(titles, (base_outputs, tuned_outputs)):
        ends = getattr(outputs, "ends_with_eos", None)
        marks = [""] * len(outputs) if ends is None else [" [EOS]" if e else " [...]" for e in ends]
        table[title] = [text.strip().replace("\n", " \u23ce ") + mark
                        for text, mark in zip(outputs, marks)]
    return pd.DataFrame(table)


def template_pattern(template: str):
    """A regular expression for text written in a template's form: each ``{column}`` becomes
    "some text", the literal parts stay (``"{quote} ({author})"`` -> ``.+ \\(.+\\)``)."""
    parts = []
    for literal, field_name, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field_name is not None:
            parts.append(r".+?")
    return re.compile("".join(parts).strip(), re.DOTALL)


def layout_markers(cfg, tokenizer=None) -> tuple:
    """The lines of the dataset's layout that are not content: "### Instruction:", "### Input:",
    "### Response:" for the instruction format; the chat template's role headers (and end-of-turn
    markers other than EOS) for chat. A response that writes one ran into a new turn."""
    sentinels = ["\x00A\x00", "\x00B\x00", "\x00C\x00", "\x00D\x00"]
    if cfg.data_format == "instruction":
        from helpers.formats import instruction_prompt

        rendered = [instruction_prompt(sentinels[0], sentinels[1])]
    elif cfg.data_format == "chat":
        roles = ["system", "user", "assistant", "user"]
        conversations = [list(zip(roles, sentinels)), list(zip(roles[1:], sentinels[1:]))]
        rendered = []
        for turns in conversations:  # some templates refuse a system turn
            try:
                rendered.append(_render_chat(
                    tokenizer, [{"role": r, "content": c} for r, c in turns], True))
            except Exception:  # noqa: BLE001 - the template's own refusal
                continue
    else:
        return ()
    skip = {t for t in (getattr(tokenizer, "eos_token", None), getattr(tokenizer, "pad_token", None))
            if t}
    markers = []
    for text in rendered:
        for segment in re.split("|".join(map(re.escape, sentinels)), text):
            for t in skip:
                segment = segment.replace(t, "\n")
            markers += [line.strip() for line in segment.splitlines() if line.strip()]
    return tuple(dict.fromkeys(markers))


def _words(text: str) -> int:
    return len(text.split())


def _word_list(text: str) -> list:
    """Lower-cased runs of letters and digits: the words of :func:`token_f1` and the vocabulary."""
    return re.findall(r"\w+", text.lower())


def _lines(text: str) -> int:
    return len(text.strip().splitlines()) or 1


@dataclass
class FormCheck:
    """Whether an output is in the dataset's form, judged on what an untuned model does not do
    by chance. Every format: the model stopped by EOS within the token budget, with a non-empty
    answer, no longer in words than ``max_words`` (1.5 times the longest reference) nor shorter
    than ``min_words`` (half the shortest), in no more lines than the most any reference has, and
    at least half of its words are words of the dataset (``vocabulary``: those of its answers),
    since an untuned model that stops by chance writes its own kind of text.
    template: the whole text, prompt included, matches the template (``pattern``). instruction and
    chat: the answer writes no line of the layout (``markers``: a new instruction or turn header).
    text and template judge the whole text, instruction and chat the answer. Build it with
    :func:`form_check`. Introduced in notebook 05."""

    kind: str
    min_words: int
    max_words: int
    max_lines: int
    pattern: object = None
    markers: tuple = ()
    vocabulary: frozenset = frozenset()

    def failure(self, prompt: str, text: str, ended_by_eos: bool, written: str = "") -> str:
        """Why an output is not in the form ("" when it is). ``written``: the output decoded
        with its special tokens (markers that are special tokens show only there)."""
        whole = (prompt + text) if self.kind in ("text", "template") else text
        if not ended_by_eos:
            return "no EOS within the token budget"
        if not text.strip():
            return "empty"
        if any(m in (written or text) for m in self.markers):
            return "ran into a new turn"
        if self.pattern is not None and not self.pattern.fullmatch(whole.strip()):
            return "not in the template's form"
        if not self.min_words <= _words(whole) <= self.max_words:
            return f"{_words(whole)} words (the references: {self.min_words}-{self.max_words})"
        if _lines(whole) > self.max_lines:
            return f"{_lines(whole)} lines (the references: at most {self.max_lines})"
        words = _word_list(text if self.kind not in ("text", "template") else whole)
        if self.vocabulary and 2 * sum(w in self.vocabulary for w in words) < len(words):
            return "mostly words the dataset's answers do not use"
        return ""


def form_check(cfg, tokenizer=None, examples=None, vocabulary_examples=None) -> FormCheck:
    """The :class:`FormCheck` of the dataset's format, its lengths taken from ``examples`` (texts
    in the form: whole examples for text and template, answers for instruction and chat; by
    default up to 200 held-out examples, :func:`helpers.data.held_out_examples`), its vocabulary
    from those and ``vocabulary_examples`` (by default up to 2,000 train examples)."""
    whole = cfg.data_format in ("text", "template")
    if examples is None or vocabulary_examples is None:
        from helpers.data import held_out_examples

        def texts(n, split):
            return [(p + r) if whole else r for p, r in held_out_examples(cfg, tokenizer, n, split)]

        examples = texts(200, "held-out") if examples is None else examples
        vocabulary_examples = texts(2000, "train") if vocabulary_examples is None else \
            vocabulary_examples
    if not examples:
        raise ValueError("no examples to take the form's lengths from")
    words = [_words(e) for e in examples]
    return FormCheck(cfg.data_format, min_words=max(1, min(words) // 2),
                     max_words=max(2, (3 * max(words) + 1) // 2),
                     max_lines=max(_lines(e) for e in examples),
                     pattern=template_pattern(cfg.template) if cfg.data_format == "template"
                     else None,
                     markers=layout_markers(cfg, tokenizer),
                     vocabulary=frozenset(w for e in [*examples, *vocabulary_examples]
                                          for w in _word_list(e)))


def form_rate(cfg, generations, tokenizer=None, check: FormCheck | None = None) -> float:
    """The fraction of ``generations`` in the dataset's form (:class:`FormCheck`; built by
    :func:`form_check` when not given). Introduced in notebook 05."""
    check = check or form_check(cfg, tokenizer)
    ids = generations.token_ids or [None] * len(generations)
    good = [not check.failure(p, t, e, _with_specials(tokenizer, i))
            for p, t, e, i in zip(generations.prompts, generations, generations.ends_with_eos, ids)]
    return sum(good) / len(good) if good else 0.0


def _with_specials(tokenizer, ids) -> str:
    if tokenizer is None or ids is None:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=False)


def _normalized(text: str) -> str:
    return " ".join(text.split())


def exact_match(output: str, reference: str) -> float:
    """1.0 when the output is the reference (spaces and line breaks collapsed, ends trimmed)."""
    return float(_normalized(output) == _normalized(reference))


def token_f1(output: str, reference: str) -> float:
    """The F1 of the words (lower-cased runs of letters and digits) the output shares with the
    reference, each counted as often as both have it: 1.0 for the same words, 0.0 for none."""
    a, b = _word_list(output), _word_list(reference)
    if not a or not b:
        return float(a == b)
    common = sum(min(a.count(w), b.count(w)) for w in set(a))
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def score(cfg, tokenizer, prompts, **outputs) -> dict:
    """The figures notebooks 05 and 06 record for each set of outputs (``base=..., tuned=...``,
    from :func:`generate` on ``prompts``): ``<name>_eos_rate``, ``<name>_form_rate``
    (:class:`FormCheck`) and, when the prompts are held-out examples with references,
    ``<name>_exact_match`` and ``<name>_token_f1`` (means over the prompts). Introduced in
    notebook 05."""
    for name, gens in outputs.items():
        if list(gens.prompts) != list(prompts):
            raise ValueError(f"{name}: these outputs were generated from other prompts")
    check = form_check(cfg, tokenizer)
    references = getattr(prompts, "references", None)
    figures = {}
    for name, gens in outputs.items():
        figures[f"{name}_eos_rate"] = gens.eos_rate
        figures[f"{name}_form_rate"] = form_rate(cfg, gens, tokenizer, check)
        if references:
            n = len(references)
            figures[f"{name}_exact_match"] = sum(map(exact_match, gens, references)) / n
            figures[f"{name}_token_f1"] = round(sum(map(token_f1, gens, references)) / n, 4)
    return figures
