"""A saved LoRA adapter checked against a base model before peft loads it: base model name, target
modules, shapes (:func:`check_adapter`). Introduced in notebook 06.

``peft.PeftModel.from_pretrained`` loads any adapter whose weight names match the base; one
trained on another base of the same architecture either fails with a long list of size
mismatches or, when the shapes agree (another vocabulary, another checkpoint), loads silently.
The check says which base the adapter was made for and which layers do not fit.
:func:`capture_activations` records what an adapter does on real inputs, layer by layer (the
streamed merge checks each merged layer against it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
import torch


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class MergeMismatch(RuntimeError):
    """The merged model does not reproduce the adapter on the same base; nothing was saved.

    ``figures`` holds the comparison (max_abs_diff, top1_agreement, ...), ``tolerance`` the limits.
    """

    def __init__(self, message: str, figures: dict, tolerance: dict):
        super().__init__(message)
        self.figures = figures
        self.tolerance = tolerance


class AdapterMismatch(ValueError):
    """The adapter was saved for a different base model; the message says how they differ."""


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
    return str(Path(name).resolve()) if Path(name).exists() else name


def same_base_name(a: str, b: str) -> bool:
    """Whether two base names/paths mean the same model: equal, the same folder, or a folder
    whose path ends with the other's Hub id (``.../EleutherAI/gpt-neox-20b``) or name (a saved
    adapter names a local base by its folder's name: :func:`helpers.checkpoints.public_files`)."""
    ca, cb = _canonical_name(a), _canonical_name(b)
    return ca == cb or any(x.replace("\\", "/").endswith("/" + y.replace("\\", "/"))
                           for x, y in ((ca, cb), (cb, ca)))


def _features(module) -> tuple[int, int] | None:
    """(inputs, outputs) of a linear-like layer; (rows, width) of an embedding; None otherwise."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2 style
        return int(module.weight.shape[0]), int(module.nf)
    return None


def check_adapter(base_model, adapter_path, *, check_base_name: bool = True) -> dict:
    """Refuse an adapter that was saved for a different base, saying why; return its settings.

    Checks, without loading the adapter's weights: that the base carries no adapter yet, the base
    model's name or path recorded in adapter_config.json against the base's own (when both are
    known; ``check_base_name=False`` skips this, e.g. for the same weights moved to another
    folder), the architecture class, and that every adapted layer exists in the base and every
    LoRA A/B matrix fits it (A: r x inputs, B: outputs x r). Raises :class:`AdapterMismatch`.
    Target modules missing from the base are peft's own error (``PeftModel.from_pretrained``
    names them). Introduced in notebook 06.
    """
    from peft import PeftModel
    from safetensors import safe_open

    if isinstance(base_model, PeftModel):
        raise ValueError("this model already carries an adapter; pass the plain base model "
                         "(e.g. a fresh helpers.loading.load_model(...)) to load the adapter on")
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
    with safe_open(str(weights_file), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|"
                         r"lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")
    bad_layers = []
    lora_layers = set()
    for key, shape in shapes.items():
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
            shape_text = " x ".join(str(int(n)) for n in shape)
            bad_layers.append(f"{layer}: the adapter's {part} is {shape_text}, but the "
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
            "base_model_name_or_path": theirs, "target_modules": settings.get("target_modules"),
            "lora_layers": len(lora_layers)}


def capture_activations(peft_model, tokenizer, texts, rows: int = 16) -> dict:
    """Real inputs of every LoRA layer of ``peft_model`` (the adapter on the base it was trained
    on) while it reads ``texts``, and what the adapter adds to them: base weight name ->
    ``(x, delta)`` in float32 on the CPU, ``rows`` positions each (spread over the texts),
    ``delta = scaling * B(A(x))`` from peft's own modules and scaling.
    :func:`helpers.streammerge.stream_merge` checks each merged layer against them. A few MB per
    layer."""
    from peft.tuners.lora import LoraLayer

    found, hooks = {}, []
    adapter = peft_model.active_adapter

    def keep(name, module):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            found.setdefault(name, []).append(x.float().cpu())
        return hook

    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            key = (name[len(prefix):] if name.startswith(prefix) else name) + ".weight"
            hooks.append(module.register_forward_pre_hook(keep(key, module)))
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad():
            for text in texts:
                enc = tokenizer(text, return_tensors="pt").to(peft_model.device)
                peft_model(**enc)
    finally:
        peft_model.train(was_training)
        for h in hooks:
            h.remove()
    modules = {(n[len(prefix):] if n.startswith(prefix) else n) + ".weight": m
               for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for key, xs in found.items():
        x = torch.cat(xs)
        x = x[torch.linspace(0, len(x) - 1, min(rows, len(x))).long()]
        m = modules[key]
        a, b = (m.lora_A[adapter].weight.detach().float().cpu(),
                m.lora_B[adapter].weight.detach().float().cpu())
        out[key] = (x, (x @ a.t() @ b.t()) * float(m.scaling[adapter]))
    return out
