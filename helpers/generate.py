"""Generation, adapter loading and a verified merge.

Notebook 05 shows what the model writes before and after training: :func:`generate` (greedy and
deterministic by default, batched with left padding, stopping at EOS, and telling whether each
text ended with EOS), :func:`default_prompts`, :func:`base_and_tuned` (the base's outputs come
from the same peft model with its adapter switched off, so no second copy of the base is held)
and :func:`side_by_side`.

Notebook 06 loads the saved adapter for inference with :func:`load_adapter`, which refuses an
adapter made for another base and says why, then merges it with :func:`merge_adapter`: into a
16-bit copy of the base (reloaded from the original weights, or dequantized from the 4-bit
model with :func:`dequantize_model`), checked by comparing logits (:func:`compare_logits`)
before anything is saved, saved as safetensors, reloaded and checked again by generating.
:func:`merge_metrics` turns the result into the manifest's figures.
"""

from __future__ import annotations

import contextlib
import copy
import html
import json
import re
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.memory import logical_numel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SOURCE_RELOADED = "reloaded 16-bit base"
SOURCE_DEQUANTIZED = "dequantized from 4-bit"

# Fixed prompts (notebooks 05 and 06). Openings suit the embedded quotes ("{quote} ({author})");
# instructions serve the instruction and chat formats.
OPENINGS = ("The only", "Love is", "A friend", "Time", "Life is")
INSTRUCTIONS = (
    "Give me a short quote about friendship.",
    "Write one sentence about time.",
    "What is the best advice you know?",
    "Describe the sea in a few words.",
)

# Merge check (comparison a): the largest relative logit difference (:func:`compare_logit_sets`:
# worst position's largest difference over its largest logit) tolerated between the merged model
# and the adapter on the same base, by the dtype both run in, and the smallest top-1 agreement.
# In float32 the merge is exact up to rounding: observed about 1e-6 relative (4e-7 absolute on the
# embedded-size test model). In 16-bit the merged weight W + BA is rounded to 8 (bf16) or 11 (fp16)
# significant bits while the adapter path adds a float32 LoRA term, so some difference is
# rounding: observed 0.015 relative (0.31 of logits up to 26) in bf16 and 0.0026 in fp16 on a
# 4-layer test model; deeper models accumulate more. The limits sit about 5x above that. A broken
# merge (a layer left out, a wrong scale, noise) moves logits by about as much as the adapter
# itself does, which the result reports as ``adapter_effect``.
MERGE_TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "min_top1": 0.99},
    torch.float16: {"rtol": 0.02, "min_top1": 0.9},
    torch.bfloat16: {"rtol": 0.08, "min_top1": 0.9},
}


class AdapterMismatch(ValueError):
    """The adapter was saved for a different base model; the message says how they differ."""


class MergeMismatch(RuntimeError):
    """The merged model does not reproduce the adapter on the same base; nothing was saved.

    ``figures`` holds the comparison (max_abs_diff, top1_agreement, ...), ``tolerance`` the limits.
    """

    def __init__(self, message: str, figures: dict, tolerance: dict):
        super().__init__(message)
        self.figures = figures
        self.tolerance = tolerance


# ============================================================================ generation (05)


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


def model_device(model) -> torch.device:
    """Where the model's first parameter lives (inputs go there)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and any the model's generation config
    names (chat models often stop at an end-of-turn token too)."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    for i in ([extra] if isinstance(extra, int) else list(extra or [])):
        if int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer has no EOS token, so generation cannot stop by itself; "
                         "set tokenizer.eos_token (helpers.models gives every tokenizer one)")
    return ids


@contextlib.contextmanager
def _generation_mode(model, tokenizer):
    """Eval mode, CPU-safe 4-bit layers, left padding and a pad token; all restored afterwards."""
    was_training = model.training
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    if model_device(model).type == "cpu":
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


def _generation_options(model, tokenizer, max_new_tokens, do_sample, temperature, top_p,
                        repetition_penalty) -> tuple[list[int], dict]:
    """The stop ids and the keyword arguments for ``model.generate``, checked."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling (use "
                         "do_sample=False for greedy decoding)")
    if do_sample and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1.0 = none)")
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
               "repetition_penalty": repetition_penalty, "eos_token_id": stop,
               "pad_token_id": pad if pad is not None else stop[0]}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    return stop, options


def _rng_devices(device: torch.device) -> list:
    return [device.index or 0] if device.type == "cuda" else []


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
    afterwards if it was). Introduced in notebook 05.
    """
    from transformers import TextStreamer

    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    stop, options = _generation_options(model, tokenizer, max_new_tokens, do_sample, temperature,
                                        top_p, repetition_penalty)
    device = model_device(model)
    step = 1 if stream else max(1, int(batch_size))
    texts, ends, counts = [], [], []
    with _generation_mode(model, tokenizer), \
            torch.random.fork_rng(devices=_rng_devices(device)):
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


def stream_generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 40,
                    do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
                    repetition_penalty: float = 1.0, seed: int = 0):
    """Yield the text of one generation piece by piece as it is produced (for a live display,
    e.g. a widget); options as for :func:`generate`. Introduced in notebook 06."""
    import threading

    from transformers import TextIteratorStreamer

    _, options = _generation_options(model, tokenizer, max_new_tokens, do_sample, temperature,
                                     top_p, repetition_penalty)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    device = model_device(model)
    errors = []
    with _generation_mode(model, tokenizer):
        enc = tokenizer([prompt], return_tensors="pt").to(device)

        def work():
            try:
                with torch.random.fork_rng(devices=_rng_devices(device)), torch.no_grad():
                    torch.manual_seed(seed)
                    model.generate(**enc, **options, streamer=streamer)
            except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
    if errors:
        raise errors[0]


def default_prompts(cfg, tokenizer=None) -> list[str]:
    """Fixed prompts suited to the dataset's format; PROMPTS ("|"-separated) overrides them.

    text: openings ("The only", "Love is", ...); template: the template's text before its first
    placeholder followed by each opening (for the embedded "{quote} ({author})": the openings);
    instruction: :data:`INSTRUCTIONS` in the instruction layout of notebook 04; chat: the same as
    user turns rendered with the tokenizer's chat template and the assistant header (needs the
    tokenizer). Introduced in notebook 05.
    """
    given = [p.strip() for p in (getattr(cfg, "prompts", "") or "").split("|")]
    given = [p for p in given if p]
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
        from helpers.data import instruction_prompt

        return [instruction_prompt(i) for i in INSTRUCTIONS]
    if kind == "chat":
        if tokenizer is None:
            raise ValueError("chat prompts are rendered with the tokenizer's chat template: "
                             "call default_prompts(cfg, tokenizer)")
        from helpers.data import DEFAULT_CHAT_TEMPLATE

        template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
        return [tokenizer.apply_chat_template([{"role": "user", "content": i}], tokenize=False,
                                              add_generation_prompt=True, chat_template=template)
                for i in INSTRUCTIONS]
    raise ValueError(f"DATA_FORMAT={kind!r}: use text, template, instruction or chat")


def base_and_tuned(model, tokenizer, prompts, **options) -> tuple[Generations, Generations]:
    """(base outputs, tuned outputs) from one peft model: the base's come from the same model
    inside ``model.disable_adapter()``, so no second copy of the base is ever loaded. ``options``
    as for :func:`generate`. Introduced in notebook 05."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"{type(model).__name__} has no adapter to switch off: pass the peft "
                        "model (from helpers.lora.attach or load_adapter)")
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, **options)
    tuned = generate(model, tokenizer, prompts, **options)
    return base, tuned


class SideBySide:
    """Prompts with two models' outputs: an HTML table in a notebook, plain text elsewhere.

    ``str(view)`` (or ``view.text``) is the plain-text version papermill logs and tests read;
    ``view.html`` the table. An output that stopped by EOS is marked "[EOS]"; one cut by
    max_new_tokens "[...]" (when the outputs come from :func:`generate`). In the text version a
    line break inside an output shows as a return sign, so each output stays on one line.
    """

    def __init__(self, prompts, left, right, titles=("base", "tuned")):
        if not len(prompts) == len(left) == len(right):
            raise ValueError(f"{len(prompts)} prompts but {len(left)} and {len(right)} outputs: "
                             "give one output per prompt to each side")
        self.prompts, self.left, self.right = list(prompts), list(left), list(right)
        self.titles = titles
        self._ends = (getattr(left, "ends_with_eos", None), getattr(right, "ends_with_eos", None))

    @staticmethod
    def _mark(ends, i) -> str:
        if ends is None:
            return ""
        return " [EOS]" if ends[i] else " [...]"

    @property
    def text(self) -> str:
        width = max(len(t) for t in self.titles)
        blocks = []
        for i, prompt in enumerate(self.prompts):
            lines = [f"[{i + 1}] {prompt!r}"]
            for title, outs, ends in zip(self.titles, (self.left, self.right), self._ends):
                shown = outs[i].strip().replace("\n", " \u23ce ")  # one line per output
                lines.append(f"  {title:<{width}} | {shown}{self._mark(ends, i)}")
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    @property
    def html(self) -> str:
        def cell(prompt, out, mark):
            return (f"<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>"
                    f"<span style='color:#888'>"
                    f"{html.escape(prompt)}</span>{html.escape(out)}"
                    f"<span style='color:#c60'>{html.escape(mark)}</span></td>")

        head = "".join(f"<th style='text-align:left'>{html.escape(t)}</th>"
                       for t in ("prompt", *self.titles))
        rows = []
        for i, prompt in enumerate(self.prompts):
            cells = "".join(cell(prompt, outs[i], self._mark(ends, i))
                            for outs, ends in zip((self.left, self.right), self._ends))
            rows.append(f"<tr><td style='text-align:left;vertical-align:top'><b>"
                        f"{html.escape(prompt)}</b></td>{cells}</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def side_by_side(prompts, base_outputs, tuned_outputs, titles=("base", "tuned")) -> SideBySide:
    """Base and tuned outputs per prompt, as a table (HTML in a notebook, text in a log).
    Introduced in notebook 05."""
    return SideBySide(prompts, base_outputs, tuned_outputs, titles)


# ====================================================================== loading an adapter (06)


def _adapter_files(adapter_path) -> tuple[Path, Path]:
    """The adapter's config and weights files, or a FileNotFoundError naming what is missing."""
    path = Path(adapter_path)
    wanted = f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
    if not path.is_dir():
        raise FileNotFoundError(
            f"no adapter folder at {path}: expected a folder holding {wanted} (notebook 05 saves "
            "them to RUN_DIR/adapter); run notebook 05 first, or give the folder it saved")
    config, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    missing = [p.name for p in (config, weights) if not p.is_file()]
    if missing:
        present = sorted(p.name for p in path.iterdir())[:12]
        hint = ""
        if (path / "adapter" / ADAPTER_CONFIG).is_file():
            hint = f"; {path / 'adapter'} holds one: pass that folder"
        elif (path / "adapter_model.bin").is_file():
            hint = ("; it holds adapter_model.bin (a pickle), which this series does not load: "
                    "re-save the adapter with save_pretrained(...) to get safetensors")
        raise FileNotFoundError(
            f"{path} is not a saved adapter: looked for {wanted}, missing {', '.join(missing)} "
            f"(the folder holds: {', '.join(present) or 'nothing'}){hint}")
    return config, weights


def _canonical_name(name: str) -> str:
    """A base model's name or path in a comparable form: Hub cache folders become their id,
    existing folders their resolved path."""
    name = str(name).strip().rstrip("/\\")
    m = re.search(r"models--([^/\\]+?)--([^/\\]+)", name)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    p = Path(name)
    if p.exists():
        return str(p.resolve())
    return name


def same_base_name(a: str, b: str) -> bool:
    """Whether two base names/paths mean the same model: equal, the same folder, or a folder
    whose path ends with the other's Hub id (``.../EleutherAI/gpt-neox-20b``)."""
    ca, cb = _canonical_name(a), _canonical_name(b)
    if ca == cb:
        return True
    for x, y in ((ca, cb), (cb, ca)):
        if "/" in y and x.replace("\\", "/").endswith("/" + y):
            return True
    return False


def _features(module) -> tuple[int, int] | None:
    """(inputs, outputs) of a linear-like layer; (rows, width) of an embedding; None otherwise."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2 style
        return int(module.weight.shape[0]), int(module.nf)
    return None


def _shape_text(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def check_adapter(base_model, adapter_path, *, check_base_name: bool = True) -> dict:
    """Refuse an adapter that was saved for a different base, saying why; return its settings.

    Checks, without loading the adapter's weights: the base model's name or path recorded in
    adapter_config.json against the base's own (when both are known; ``check_base_name=False``
    skips this, e.g. for the same weights moved to another folder), the architecture class, that
    every target module exists in the base, and that every LoRA A/B matrix fits the layer it
    adapts (A: r x inputs, B: outputs x r). Raises :class:`AdapterMismatch`. Introduced in
    notebook 06.
    """
    from safetensors import safe_open

    config_file, weights_file = _adapter_files(adapter_path)
    try:
        settings = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterMismatch(
            f"{config_file} is not valid JSON ({err}); re-save the adapter") from None
    problems = []
    ours = getattr(base_model, "name_or_path", None) or getattr(
        getattr(base_model, "config", None), "_name_or_path", None)
    theirs = settings.get("base_model_name_or_path")
    if check_base_name and ours and theirs and not same_base_name(ours, theirs):
        problems.append(f"it was trained on base {theirs!r}, this base is {ours!r} (if they are "
                        "the same weights in another place, pass check_base_name=False)")
    made_for = (settings.get("auto_mapping") or {}).get("base_model_class")
    if made_for and made_for != type(base_model).__name__:
        problems.append(f"it was made for a {made_for}, this base is a {type(base_model).__name__}")

    modules = dict(base_model.named_modules())
    targets = settings.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        if not any(re.fullmatch(targets, n) for n in modules):
            problems.append(f"its target pattern {targets!r} matches no layer of this base")
    elif isinstance(targets, (list, tuple)):
        short = {n.rsplit(".", 1)[-1] for n in modules}
        absent = [t for t in targets if t not in modules and t not in short
                  and not any(n.endswith("." + t) for n in modules)]
        if absent:
            problems.append(f"this base has no layer named {', '.join(sorted(absent)[:5])} "
                            "(the adapter's target modules)")

    shapes = []
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            shapes.append((key, tuple(f.get_slice(key).get_shape())))
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|"
                         r"lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")
    bad_layers = []
    lora_layers = set()
    for key, shape in shapes:
        m = pattern.match(key)
        if not m:
            continue
        layer, part = m.group(1), m.group(2)
        lora_layers.add(layer)
        module = modules.get(layer)
        if module is None:
            problems.append(f"the adapter has LoRA weights for layer {layer}, which this base "
                            "does not have")
            continue
        feats = _features(module)
        if feats is None:
            continue
        d_in, d_out = feats
        if part in ("lora_A", "lora_embedding_A"):
            ok, want = shape[-1] == d_in, f"r x {d_in}"
        else:
            ok, want = shape[0] == d_out, f"{d_out} x r"
        if not ok:
            kind = type(module).__name__
            bad_layers.append(f"{layer}: the adapter's {part} is {_shape_text(shape)}, but the "
                              f"base layer is {kind} {d_in} -> {d_out} (needs {want})")
    if bad_layers:
        more = f" (and {len(bad_layers) - 5} more)" if len(bad_layers) > 5 else ""
        problems.append("its LoRA shapes do not fit this base: " + "; ".join(bad_layers[:5])
                        + more)
    if problems:
        raise AdapterMismatch(
            f"the adapter in {Path(adapter_path)} does not fit this base model: "
            + "; ".join(problems) + ". Load the base model the adapter was trained on (the same "
            "MODEL as in notebook 05), or train an adapter for this one.")
    return {"r": settings.get("r"), "lora_alpha": settings.get("lora_alpha"),
            "base_model_name_or_path": theirs, "target_modules": targets,
            "lora_layers": len(lora_layers)}


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def load_adapter(base_model, adapter_path, *, check_base_name: bool = True,
                 is_trainable: bool = False):
    """The saved adapter on ``base_model`` (a ``peft.PeftModel``), checked first.

    ``adapter_path`` is the folder notebook 05 saved (RUN_DIR/adapter) with adapter_config.json
    and adapter_model.safetensors; a missing folder or file is named in the error, and an
    adapter saved for a different base is refused with the reason (:func:`check_adapter`). The
    base model is modified in place (LoRA layers are inserted into it). Introduced in notebook 06.
    """
    from peft import PeftModel

    if hasattr(base_model, "peft_config"):
        raise ValueError("this model already carries an adapter; pass the plain base model "
                         "(e.g. a fresh helpers.models.load_model(...)) to load_adapter")
    check_adapter(base_model, adapter_path, check_base_name=check_base_name)
    model = PeftModel.from_pretrained(base_model, str(adapter_path), is_trainable=is_trainable)
    if not is_trainable:
        model.eval()
    return model


# ============================================================================== merging (06)


def _unpacked_for_cpu(data, state):
    """A 4-bit weight that bitsandbytes repacked for CPU inference, back in its usual layout, as
    copies (the layer keeps its own). The repacked block scales are bf16 values, used as they
    are, so the result equals what the repacked layer computes."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    copied = copy.copy(state)
    copied.original_nested = False  # keep the float scales; do not quantize them again
    packed_scales = state.absmax
    data, copied = _convert_weight_packed_for_cpu_inverse(data, copied)
    copied.absmax = packed_scales.T.reshape(-1).float().contiguous()
    copied.nested = False
    return data, copied


def dequantize_weight(weight) -> torch.Tensor:
    """The dense (outputs x inputs) matrix a bitsandbytes 4-bit weight stands for, in the dtype it
    was quantized from (``bitsandbytes.functional.dequantize_4bit`` with its quant_state).
    Introduced in notebook 06."""
    from bitsandbytes.functional import dequantize_4bit

    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError("this 4-bit weight has no quant_state (not quantized yet, or on the "
                         "meta device); load the model fully before dequantizing")
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _unpacked_for_cpu(data, state)
    return dequantize_4bit(data, state)


def _plain_name(name: str) -> str | None:
    """A parameter name of a (possibly peft-wrapped) model as the plain model names it; None for
    adapter parameters and trained copies that are not part of the base."""
    if ".lora_" in name or name.startswith("lora_") or ".modules_to_save." in name:
        return None
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def compute_dtype_of(model) -> torch.dtype:
    """The dtype a 4-bit model computes in (its layers' ``compute_dtype``), else its parameters'
    floating dtype."""
    for module in model.modules():
        dt = getattr(module, "compute_dtype", None)
        if isinstance(dt, torch.dtype):
            return dt
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def dequantize_model(model, dtype: torch.dtype | None = None, device=None):
    """A plain 16-bit copy of a 4-bit model: each ``bnb.nn.Linear4bit`` weight dequantized
    (:func:`dequantize_weight`) into an ``nn.Linear`` in ``dtype`` (default: the model's compute
    dtype), every other weight copied; the 4-bit model is left as it is. Adapter layers of a peft
    model are skipped (the copy is the base). The copy is built on the meta device and filled, so
    memory holds each weight once. Used by :func:`merge_adapter` when the original 16-bit weights
    are not available. Introduced in notebook 06.
    """
    import bitsandbytes as bnb
    from accelerate import init_empty_weights

    inner = model.get_base_model() if _is_peft(model) else model
    dtype = dtype or compute_dtype_of(inner)
    device = torch.device(device) if device is not None else model_device(inner)
    state, quantized = {}, set()
    with torch.no_grad():
        for name, module in inner.named_modules():
            if isinstance(module, bnb.nn.Linear8bitLt):
                raise TypeError(f"{name} is an 8-bit layer: dequantize_model handles 4-bit "
                                 "models only")
            if isinstance(module, bnb.nn.Linear4bit):
                plain = _plain_name(name + ".weight")
                if plain is None:
                    continue
                state[plain] = dequantize_weight(module.weight).to(device=device, dtype=dtype)
                quantized.add(name + ".weight")
        for name, param in inner.named_parameters():
            plain = _plain_name(name)
            if plain is None or name in quantized:
                continue
            state[plain] = param.detach().to(device=device, dtype=dtype if
                                             param.is_floating_point() else param.dtype)
    config = copy.deepcopy(inner.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    from helpers import models

    for key, value in models._dtype_kwarg(dtype).items():
        setattr(config, key, value)
    with init_empty_weights(include_buffers=False):
        plain_model = type(inner)(config)
    result = plain_model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"dequantizing produced weights the plain model does not have: "
                           f"{result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain_model.tie_weights()
    left = [n for n, p in plain_model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"dequantizing left weights unset: {left[:5]}")
    plain_model.to(device)
    plain_model.name_or_path = getattr(inner, "name_or_path", config._name_or_path)
    if getattr(inner, "generation_config", None) is not None:
        plain_model.generation_config = copy.deepcopy(inner.generation_config)
    plain_model.eval()
    return plain_model


def logits_for(model, tokenizer, texts) -> list[torch.Tensor]:
    """Float32 logits (positions x vocabulary, on the CPU) for each text, one text at a time (no
    padding), with the model in eval mode. Introduced in notebook 06."""
    device = model_device(model)
    out = []
    with _generation_mode(model, tokenizer), torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt").to(device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def compare_logit_sets(reference: list, other: list) -> dict:
    """Agreement of two lists of logits (same texts): ``max_abs_diff``; ``max_rel_diff`` (at each
    position the largest difference over the largest reference logit magnitude, the worst
    position); ``mean_abs_diff``; ``top1_agreement`` (fraction of positions whose argmax token
    is the same); ``positions``. All in float32. Introduced in notebook 06."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference texts but {len(other)} compared")
    ref = torch.cat([r.float() for r in reference])
    oth = torch.cat([o.float() for o in other])
    if ref.shape != oth.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(oth.shape)} (the "
                         "models have different vocabularies?)")
    diff = (ref - oth).abs()
    scale = ref.abs().amax(dim=-1).clamp_min(1e-12)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff.amax(dim=-1) / scale).max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).float().mean()),
        "positions": int(ref.shape[0]),
    }


def compare_logits(reference_model, merged_model, tokenizer, prompts) -> dict:
    """How closely ``merged_model`` reproduces ``reference_model`` (usually the adapter on its
    base) on fixed prompts: max absolute and relative logit difference, mean difference, top-1
    agreement, computed in float32 (:func:`compare_logit_sets`). Introduced in notebook 06."""
    return compare_logit_sets(logits_for(reference_model, tokenizer, prompts),
                              logits_for(merged_model, tokenizer, prompts))


def merge_tolerance(dtype: torch.dtype) -> dict:
    """The limits comparison (a) must meet for a merge in ``dtype`` (:data:`MERGE_TOLERANCE`;
    notebook 06)."""
    return dict(MERGE_TOLERANCE.get(dtype, MERGE_TOLERANCE[torch.bfloat16]))


def merge_into_base(peft_model):
    """peft's ``merge_and_unload()``: W <- W + (alpha / r) B A in every adapted layer, adapter
    layers removed; returns the plain base model, now holding the merged weights (notebook 06)."""
    return peft_model.merge_and_unload()


def _folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def _replace_folder(tmp: Path, out_dir: Path) -> None:
    """Move a finished folder into place; an earlier model folder there is replaced, anything
    else is refused."""
    if out_dir.exists():
        entries = list(out_dir.iterdir())
        if entries and not (out_dir / "config.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out_dir} exists and is not a saved model; choose another "
                                  "folder or empty it")
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _fits_on(device: torch.device, n_bytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return n_bytes * 1.2 < free


@dataclass
class MergeResult:
    """What :func:`merge_adapter` did and measured.

    ``source``: where the 16-bit base came from (:data:`SOURCE_RELOADED` or
    :data:`SOURCE_DEQUANTIZED`). ``vs_same_base``: merged vs the adapter on the same 16-bit base
    (comparison a, the merge's own error). ``vs_4bit``: merged vs the adapter on the 4-bit base
    used in training (comparison b, which adds the quantization error; None without a 4-bit
    model). ``adapter_effect``: how far the adapter moves the 16-bit base's logits (max abs), the
    scale a broken merge would show. ``reference_text`` / ``merged_text``: greedy outputs of the
    adapter on the 16-bit base and of the merged model reloaded from disk.
    """

    source: str
    dtype: str
    device: str
    adapter_path: str
    out_dir: str | None
    vs_same_base: dict
    vs_4bit: dict | None
    adapter_effect: float
    tolerance: dict
    reference_text: list
    merged_text: list
    generation_matches: bool
    reload_max_abs_diff: float
    size_bytes: int
    memory: object = None
    notes: list = field(default_factory=list)
    model: object = None

    def text(self) -> str:
        a, b = self.vs_same_base, self.vs_4bit
        lines = [
            f"Merged into a {self.dtype} base on {self.device} ({self.source}).",
            (f"(a) merged vs adapter on the same base: max |logit diff| "
             f"{a['max_abs_diff']:.2e}, relative {a['max_rel_diff']:.1e} (tolerance "
             f"{self.tolerance['rtol']:.0e}), top-1 agreement {a['top1_agreement']:.3f} over "
             f"{a['positions']} positions; the adapter itself moves logits by up to "
             f"{self.adapter_effect:.3f}."),
        ]
        if b is not None:
            why = ("the 16-bit base was dequantized from these 4-bit weights, so only rounding "
                   "differs" if self.source == SOURCE_DEQUANTIZED else
                   "the 4-bit quantization error; expected to be larger than (a)")
            lines.append(f"(b) merged vs adapter on the 4-bit training base: max |logit diff| "
                         f"{b['max_abs_diff']:.2e}, top-1 agreement {b['top1_agreement']:.3f} "
                         f"({why}).")
        if self.out_dir:
            lines.append(f"Saved {self.size_bytes / 1e6:.1f} MB of safetensors to {self.out_dir}; "
                         f"reloaded: logits equal to the merged model within "
                         f"{self.reload_max_abs_diff:.1e}, greedy text "
                         + ("identical to" if self.generation_matches else "DIFFERENT from")
                         + " the adapter on the 16-bit base.")
        lines += self.notes
        return "\n".join(lines)

    __str__ = text


def merge_adapter(base_16bit_loader, adapter_path, *, tokenizer, prompts, out_dir=None,
                  quantized_model=None, dtype: torch.dtype | None = None, device=None,
                  max_new_tokens: int = 20, rtol: float | None = None,
                  min_top1: float | None = None, check_base_name: bool = True,
                  keep_model: bool = False) -> MergeResult:
    """Merge the adapter into a 16-bit copy of the base, verify, save, reload, verify again.

    Why never into the 4-bit weights: a LoRA update is small next to the weights (about 1% of
    their size), and NF4 keeps 16 levels per block of 64 weights, spaced about 10% of the block's
    largest weight apart. Rounding W + BA back to those levels returns most weights to the level
    they started at, so most of what training learned would be thrown away, and the merged model
    would no longer match the adapter it came from. The merge goes into 16-bit (float32 on CPU)
    weights instead, where W + BA keeps the update.

    Steps (each tracked with ``helpers.memory``: CPU RSS and GPU memory before/after):

    1. The 16-bit base: ``base_16bit_loader()`` (e.g. ``lambda: models.load_16bit(MODEL)``)
       where the original weights are available; when it is None, returns None or raises
       OSError (no such weights), the base is dequantized from ``quantized_model``
       (:func:`dequantize_model`). ``result.source`` says which.
    2. The adapter on it (:func:`load_adapter`); its greedy outputs on ``prompts`` and its logits
       on each prompt followed by that output (the reference). With ``quantized_model`` (the
       4-bit base, with or without the adapter loaded; a plain one gets it for the comparison
       and is given back plain), the same logits from the 4-bit model too.
    3. ``merge_and_unload()`` (:func:`merge_into_base`), then the merged logits. Comparison (a),
       merged vs adapter on the same base, must meet :func:`merge_tolerance` (or ``rtol`` /
       ``min_top1``), else :class:`MergeMismatch` is raised and nothing is saved. Comparison (b),
       vs the 4-bit model, is reported, not enforced.
    4. With ``out_dir``: saved there as safetensors in shards of at most 2 GB, with the tokenizer
       (written to a temporary folder first, so a failure leaves no half-saved model); the
       in-memory copy freed; reloaded with ``AutoModelForCausalLM.from_pretrained``; its logits
       compared with the merged ones and its greedy text with the reference text.

    ``device``: where the 16-bit copy goes when dequantizing (default: beside the 4-bit model, or
    the CPU when the card lacks room). ``keep_model=True`` keeps the reloaded (or merged) model on
    ``result.model``. Introduced in notebook 06.
    """
    from transformers import AutoModelForCausalLM

    from helpers import memory, models

    log = memory.MemoryLog()
    notes: list[str] = []
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt to compare the merged model on")
    _adapter_files(adapter_path)  # a missing adapter fails before anything is loaded

    # 1. a 16-bit base
    base16, source = None, SOURCE_RELOADED
    if base_16bit_loader is not None:
        with log.track("load 16-bit base"):
            try:
                base16 = base_16bit_loader()
            except OSError as err:
                notes.append(f"No 16-bit weights to reload ({type(err).__name__}: "
                             f"{str(err)[:200]}); dequantized the 4-bit model instead.")
    if base16 is None:
        if quantized_model is None:
            raise ValueError("no 16-bit base: base_16bit_loader gave none and no quantized_model "
                             "was passed to dequantize; pass one of them")
        source = SOURCE_DEQUANTIZED
        inner = quantized_model.get_base_model() if _is_peft(quantized_model) else quantized_model
        dt = dtype or compute_dtype_of(inner)
        target = torch.device(device) if device is not None else model_device(inner)
        n_bytes = sum(logical_numel(p) for p in inner.parameters()) * torch.finfo(dt).bits // 8
        if device is None and not _fits_on(target, n_bytes):
            notes.append(f"The 16-bit copy ({n_bytes / 1e9:.1f} GB) does not fit beside the 4-bit "
                         f"model on {target}: built on the CPU.")
            target = torch.device("cpu")
        with log.track("dequantize 4-bit base"):
            base16 = dequantize_model(quantized_model, dtype=dt, device=target)
    merge_dtype = compute_dtype_of(base16)
    tol = merge_tolerance(merge_dtype)
    if rtol is not None:
        tol["rtol"] = float(rtol)
    if min_top1 is not None:
        tol["min_top1"] = float(min_top1)

    # 2. the adapter on it, and the reference outputs
    with log.track("attach adapter"):
        peft16 = load_adapter(base16, adapter_path, check_base_name=check_base_name)
        del base16  # held by peft16 now; one name, so that freeing it below frees it
    with log.track("reference outputs"):
        reference_text = generate(peft16, tokenizer, prompts, max_new_tokens=max_new_tokens)
        texts = [p + t for p, t in zip(prompts, reference_text)]
        reference = logits_for(peft16, tokenizer, texts)
        with peft16.disable_adapter():
            base_only = logits_for(peft16, tokenizer, texts)
        adapter_effect = compare_logit_sets(reference, base_only)["max_abs_diff"]
        del base_only
        quantized_logits = None
        if quantized_model is not None and _is_peft(quantized_model):
            quantized_logits = logits_for(quantized_model, tokenizer, texts)
        elif quantized_model is not None:  # attach for the comparison, then take it off again
            q_model = load_adapter(quantized_model, adapter_path, check_base_name=check_base_name)
            try:
                quantized_logits = logits_for(q_model, tokenizer, texts)
            finally:
                q_model.unload()
                for attr in ("peft_config", "_hf_peft_config_loaded"):
                    if attr in vars(quantized_model):
                        delattr(quantized_model, attr)

    # 3. merge and compare
    with log.track("merge"):
        merged = merge_into_base(peft16)
        del peft16
    merged_logits = logits_for(merged, tokenizer, texts)
    vs_same = compare_logit_sets(reference, merged_logits)
    vs_4bit = compare_logit_sets(quantized_logits, merged_logits) if quantized_logits else None
    if vs_same["max_rel_diff"] > tol["rtol"] or vs_same["top1_agreement"] < tol["min_top1"]:
        figures = {**vs_same, "adapter_effect": adapter_effect}
        del merged  # an exception kept in a notebook must not keep the model alive
        memory.free()
        raise MergeMismatch(
            f"the merged model does not reproduce the adapter on the same {merge_dtype} base: "
            f"max |logit diff| {vs_same['max_abs_diff']:.3g}, relative "
            f"{vs_same['max_rel_diff']:.3g} (tolerance {tol['rtol']:.3g}), "
            f"top-1 agreement {vs_same['top1_agreement']:.3f} (needs {tol['min_top1']:.3f}) "
            f"over {vs_same['positions']} positions; the adapter itself moves logits by up to "
            f"{adapter_effect:.3g}. Nothing was saved. Check that the adapter and the base belong "
            "together, and merge into a 16-bit base (never a 4-bit one).", figures, tol)

    # 4. save, reload, generate again
    merged_text, matches, reload_diff, size, out = list(reference_text), True, 0.0, 0, None
    device_used = model_device(merged)
    result_model = merged if keep_model else None
    if out_dir is not None:
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with log.track("save merged"):
            tmp.parent.mkdir(parents=True, exist_ok=True)
            merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
            tokenizer.save_pretrained(tmp)
            _replace_folder(tmp, out)
        size = _folder_bytes(out)
        result_model = None
        del merged
        memory.free()
        with log.track("reload merged"):
            reloaded = AutoModelForCausalLM.from_pretrained(
                out, device_map=models._device_map(device_used),
                **models._dtype_kwarg(merge_dtype))
        reload_diff = compare_logit_sets(merged_logits,
                                         logits_for(reloaded, tokenizer, texts))["max_abs_diff"]
        merged_text = generate(reloaded, tokenizer, prompts, max_new_tokens=max_new_tokens)
        matches = list(merged_text) == list(reference_text)
        if not matches:
            notes.append("The reloaded merged model's greedy text differs from the adapter's on "
                         "the 16-bit base" + (" (16-bit rounding can flip near-ties)."
                                              if merge_dtype != torch.float32 else "."))
        if keep_model:
            result_model = reloaded
        else:
            del reloaded
            memory.free()
    return MergeResult(
        source=source, dtype=str(merge_dtype).replace("torch.", ""),
        device=str(device_used),
        adapter_path=str(adapter_path), out_dir=str(out) if out else None,
        vs_same_base=vs_same, vs_4bit=vs_4bit, adapter_effect=adapter_effect, tolerance=tol,
        reference_text=list(reference_text), merged_text=list(merged_text),
        generation_matches=matches, reload_max_abs_diff=reload_diff, size_bytes=size,
        memory=log, notes=notes, model=result_model)


def merge_metrics(result: MergeResult) -> dict:
    """The merge's figures for the run manifest (notebook 06)."""
    a = result.vs_same_base
    out = {
        "merge_max_abs_logit_diff": a["max_abs_diff"],
        "merge_max_rel_logit_diff": a["max_rel_diff"],
        "merge_top1_agreement": a["top1_agreement"],
        "merge_adapter_effect_max_abs": result.adapter_effect,
        "merge_dequantized": int(result.source == SOURCE_DEQUANTIZED),
        "merged_generation_matches": int(result.generation_matches),
        "merged_size_bytes": result.size_bytes,
        "merge_reload_max_abs_logit_diff": result.reload_max_abs_diff,
    }
    if result.vs_4bit is not None:
        out["merge_max_abs_logit_diff_vs_4bit"] = result.vs_4bit["max_abs_diff"]
        out["merge_top1_agreement_vs_4bit"] = result.vs_4bit["top1_agreement"]
    if result.memory is not None:
        out.update(result.memory.as_metrics(prefix="merge_"))
    return out


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
    if not len(generations):
        return 0.0
    pattern = template_pattern(cfg.template) if cfg.data_format == "template" else None
    good = 0
    for prompt, text, eos in zip(generations.prompts, generations, generations.ends_with_eos):
        if pattern is not None:
            good += bool(eos and pattern.fullmatch((prompt + text).strip()))
        else:
            good += bool(eos and text.strip())
    return good / len(generations)
