"""Generation (notebooks 02, 05 and 06).

Notebook 05 shows what the model writes before and after training: :func:`generate` (greedy and
deterministic by default, batched with left padding, stopping at EOS, and telling whether each
text ended with EOS), :func:`default_prompts`, :func:`base_and_tuned` (the base's outputs come
from the same peft model with its adapter switched off, so no second copy of the base is held),
:func:`side_by_side` (a pandas table) and :func:`form_rate`. Notebook 06 generates with the loaded
adapter (greedy, sampled, streamed); the adapter check is :mod:`helpers.adapters`, the verified
merge :mod:`helpers.merge`.
"""

from __future__ import annotations

import contextlib
import re
import string
import torch


# Fixed prompts (notebooks 05 and 06). Openings suit the embedded quotes ("{quote} ({author})");
# instructions serve the instruction and chat formats.
OPENINGS = ("The only", "Love is", "A friend", "Time", "Life is")
INSTRUCTIONS = (
    "Give me a short quote about friendship.",
    "Write one sentence about time.",
    "What is the best advice you know?",
    "Describe the sea in a few words.",
)


class Generations(list):
    """The generated texts (a list of str), with what happened to each.

    ``ends_with_eos[i]``: generation i stopped because the model wrote EOS (within
    ``max_new_tokens``), rather than running out of tokens; ``new_tokens[i]``: how many tokens it
    wrote before stopping (EOS not counted); ``prompts``: the prompts, in order.
    """

    def __init__(self, texts, ends_with_eos, new_tokens, prompts):
        super().__init__(texts)
        self.ends_with_eos = list(ends_with_eos)
        self.new_tokens = list(new_tokens)
        self.prompts = list(prompts)

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
    texts, ends, counts = [], [], []
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with _generation_mode(model, tokenizer), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
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
    return Generations(texts, ends, counts, prompts)


def default_prompts(cfg, tokenizer=None) -> list[str]:
    """Fixed prompts suited to the dataset's format; PROMPTS ("|"-separated) overrides them.

    text: openings ("The only", "Love is", ...); template: the template's text before its first
    placeholder followed by each opening (for the embedded "{quote} ({author})": the openings);
    instruction: :data:`INSTRUCTIONS` in the instruction layout of notebook 04; chat: the same as
    user turns rendered with the tokenizer's chat template and the assistant header (needs the
    tokenizer). Introduced in notebook 05.
    """
    given = [p.strip() for p in (getattr(cfg, "prompts", "") or "").split("|") if p.strip()]
    if given:
        return given
    kind = getattr(cfg, "data_format", "template")
    if kind == "text":
        return list(OPENINGS)
    if kind == "template":
        lead = ""
        for literal, field_name, _, _ in string.Formatter().parse(cfg.template):
            lead += literal
            if field_name is not None:
                break
        return [lead + o for o in OPENINGS]
    if kind == "instruction":
        from helpers.formats import instruction_prompt

        return [instruction_prompt(i) for i in INSTRUCTIONS]
    if kind == "chat":
        if tokenizer is None:
            raise ValueError("chat prompts are rendered with the tokenizer's chat template: "
                             "call default_prompts(cfg, tokenizer)")
        from helpers.formats import DEFAULT_CHAT_TEMPLATE

        template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
        return [tokenizer.apply_chat_template([{"role": "user", "content": i}], tokenize=False,
                                              add_generation_prompt=True, chat_template=template)
                for i in INSTRUCTIONS]
    raise ValueError(f"DATA_FORMAT={kind!r}: use text, template, instruction or chat")


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


def form_rate(cfg, generations) -> float:
    """The fraction of generations, prompt included, in the dataset's form: for a template, the
    whole text matches it (a quotation followed by "(Author)" for the embedded default) and
    generation stopped by EOS; for other formats, a non-empty answer that stopped by EOS.
    Introduced in notebook 05."""
    pattern = template_pattern(cfg.template) if cfg.data_format == "template" else None
    good = [eos and bool(pattern.fullmatch((prompt + text).strip()) if pattern else text.strip())
            for prompt, text, eos in zip(generations.prompts, generations,
                                         generations.ends_with_eos)]
    return sum(good) / len(good) if good else 0.0
