"""What "a model" is in the series: where it comes from, and how it is loaded in 4-bit (notebook 02).

``MODEL`` takes one of four kinds of value, and :func:`resolve` says which one it is:

- ``"embedded"``: a small GPT-NeoX (the family of the original QLoRA article) pretrained offline
  by :func:`helpers.embedded.build_embedded` and saved in the same layout as a Hub model, so
  loading it in 4-bit exercises exactly the code a Hub model goes through;
- a local folder written by ``save_pretrained`` (``config.json``, weights, tokenizer files);
- a Hugging Face Hub id such as ``EleutherAI/gpt-neox-20b`` (loaded as in the article);
- ``"rehearsal:<name>"``: random weights of a real architecture built directly in 4-bit
  (:func:`helpers.rehearsal.build_rehearsal`), to measure a 20B fine-tune before anything is
  downloaded. Shipped configurations are listed in :data:`REHEARSALS`; a Hub id after
  ``rehearsal:`` takes that model's ``config.json`` only.

Notebook 02 builds the ``BitsAndBytesConfig`` and calls ``from_pretrained`` in its own cells;
:func:`quantization_config` is the same config for :func:`helpers.loading.load_model`, which the
later notebooks and the command line use.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
import torch
from transformers import AutoConfig
from helpers import env
from helpers.config import ConfigError
from helpers.embedded import EMBEDDED_VERSION, embedded_path


def _from_pretrained(loader, source: ModelSource, **kwargs):
    """``loader.from_pretrained`` with Hub failures turned into one clear error.

    When the Hub cannot be reached, only files already in the local Hub cache are used
    (``local_files_only``), so the answer comes in seconds instead of after every retry.
    """
    from huggingface_hub.errors import HFValidationError

    if source.kind != "hub":
        return loader.from_pretrained(source.location, **kwargs)
    reachable = hub_reachable()
    if not reachable:
        kwargs["local_files_only"] = True
        if hasattr(loader, "_model_mapping"):  # an AutoModel class: its adapter lookup too
            kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        return loader.from_pretrained(source.location, **kwargs)
    except (OSError, HFValidationError) as err:
        raise _hub_failure(source, err, reachable) from err


def _device(device=None) -> torch.device:
    dev = torch.device(device if device is not None else env.device())
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _device_map(dev: torch.device) -> dict:
    return {"": dev.index} if dev.type == "cuda" else {"": str(dev)}


def cpu_safe(model):
    """Keep 4-bit layers trainable on CPU (notebooks 02-06).

    bitsandbytes 0.50 repacks each ``Linear4bit`` weight for fast CPU inference on its first
    forward in eval mode without gradients, on processors with AVX512-BF16; training afterwards
    fails ("a view of a leaf Variable that requires grad is being used in an in-place
    operation"). This turns that repacking off (and undoes it where it already happened).
    """
    import bitsandbytes as bnb

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


REHEARSAL_PREFIX = "rehearsal:"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

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


class ModelUnavailableError(ConfigError):
    """The model named by MODEL cannot be had here; the message lists what can."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from (:func:`resolve`).

    ``kind`` is "embedded", "local", "hub" or "rehearsal"; ``name`` is what to call it in reports; ``path`` is the
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
        if name in REHEARSALS:  # the Hub id its description starts with, if any (its tokenizer)
            hub_id = REHEARSALS[name].split(",")[0]
            return ModelSource("rehearsal", name, path=CONFIGS_DIR / f"{name}.json",
                               hub_id=hub_id if "/" in hub_id else None)
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


def quantization_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype=None,
                        quant_storage="uint8"):
    """The 4-bit settings of the series as a ``BitsAndBytesConfig``: the one notebook 02 builds in
    a cell, for :func:`helpers.loading.load_model`.

    ``compute_dtype``: a torch dtype, a name ("bfloat16", ...) or None/"auto" for
    :func:`helpers.env.compute_dtype` (bf16 on capability >= 8, fp16 on older GPUs, fp32 on CPU).
    ``quant_storage``: the dtype the packed 4-bit values are stored in (``uint8``; under FSDP the
    compute dtype, see :func:`helpers.env.quant_storage_dtype`; "auto" decides by the launch).
    """
    from transformers import BitsAndBytesConfig

    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"QUANT_TYPE={quant_type!r}: use 'nf4' (the QLoRA default) or 'fp4'")
    compute = _compute_dtype(compute_dtype)
    storage = quant_storage
    if not isinstance(storage, torch.dtype):
        try:
            storage = env.quant_storage_dtype(quant_storage or "auto", compute)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=bool(double_quant),
        bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=storage)


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


def rehearsal_config(name):
    """The transformers config of a rehearsal: a shipped file, or a Hub id's ``config.json``."""
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


def load_config(model):
    """MODEL's transformers config without its weights (for the estimator, notebook 02): the
    embedded model's, a local folder's, a Hub id's, or a rehearsal's shipped config."""
    source = model if isinstance(model, ModelSource) else resolve(model)
    if source.kind == "rehearsal":
        return rehearsal_config(source)
    return _from_pretrained(AutoConfig, source)
