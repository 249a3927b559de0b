"""What machine this is, and the one dtype decision the rest of the series follows.

Notebook 01 reads the machine with torch and tests bitsandbytes in its own cells, and adds this
module's instruments (:func:`requirement_check`, :func:`verdict`); everything else calls
:func:`compute_dtype` / :func:`precision_flags` so that the 4-bit compute dtype and the Trainer's
fp16/bf16 flags can never disagree (the original recipe's bf16-compute-with-fp16-flag mismatch).
Imports nothing from the rest of ``helpers``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import platform
import sys
from pathlib import Path

import torch

from helpers import units


def has_frontend() -> bool:
    """True only inside an IPython kernel that a live front end (Jupyter, Colab) is attached to.

    ``QLORA_SERIES_STATIC=1`` forces the static twins (papermill runs set it).
    """
    if os.environ.get("QLORA_SERIES_STATIC") == "1":
        return False
    if "google.colab" in sys.modules:
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    if ip is None or not hasattr(ip, "kernel"):
        return False
    return "PAPERMILL_EXECUTION" not in os.environ and "papermill" not in sys.modules


KEY_PACKAGES = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets",
                "ipywidgets", "matplotlib", "papermill")


def device() -> str:
    """"cuda" when a CUDA GPU is usable, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_dtype(requested: str = "auto") -> torch.dtype:
    """The dtype 4-bit layers compute in and training runs in.

    auto: bfloat16 on GPUs of compute capability >= 8 (Ampere and later), which compute it
    natively; float16 on older GPUs (T4, V100), where ``torch.cuda.is_bf16_supported()`` answers
    True although bf16 is emulated, slowly, so the capability is the honest test; float32 on CPU,
    where bf16 autocast is slow on most processors and the embedded model is small enough.
    """
    if requested != "auto":
        try:
            return FLOAT_DTYPES[requested]
        except KeyError:
            raise ValueError(
                f"COMPUTE_DTYPE={requested!r}: use auto, bfloat16, float16 or float32") from None
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(0)[0] >= 8 else torch.float16


def flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1, true, yes, on, in
    any case), as accelerate and huggingface_hub read their switches."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def fsdp_active() -> bool:
    """True inside a process that ``accelerate launch`` started with an FSDP config (it sets
    ``ACCELERATE_USE_FSDP``); the 4-bit weights must then be stored in a dtype FSDP can shard."""
    return flag("ACCELERATE_USE_FSDP")


def quant_storage_dtype(requested: str = "auto", compute: torch.dtype | None = None, *,
                        fsdp: bool | None = None) -> torch.dtype:
    """The dtype bitsandbytes packs 4-bit weights into (``bnb_4bit_quant_storage``).

    auto: ``uint8`` (two 4-bit values per byte, bitsandbytes' default) in a single process or
    under DDP; under FSDP the compute dtype, because FSDP flattens every parameter of a wrapped
    layer into one tensor of one dtype, and it shards floating-point tensors only. The packed
    bytes are the same either way: a bfloat16 element holds four 4-bit values. ``fsdp``: whether
    the run is sharded (default: this process's launch, :func:`fsdp_active`; a plan checked
    before launching says it). Introduced with scaling out (notebook 05).
    """
    if requested != "auto":
        try:
            return {"uint8": torch.uint8, **FLOAT_DTYPES}[requested]
        except KeyError:
            raise ValueError(f"QUANT_STORAGE={requested!r}: use auto, uint8, bfloat16, float16 "
                             "or float32") from None
    if (fsdp_active() if fsdp is None else fsdp):
        return compute if compute is not None else compute_dtype("auto")
    return torch.uint8


def precision_flags(dtype: torch.dtype) -> dict:
    """TrainingArguments flags that match the compute dtype (one decision, two places).

    float16 (T4, V100): ``fp16=True``, i.e. autocast with loss scaling, which float16 gradients
    need. bfloat16: no flag. The model is loaded in bfloat16 and its 4-bit layers compute in
    bfloat16, so it runs natively; the Trainer's ``bf16=True`` would add autocast, under which
    LayerNorm returns float32 and every block of GPT-NeoX/GPT-J then carries a float32 stream
    (twice the activation memory, and on an H200 half of a step's GPU time spent in float32
    elementwise kernels and casts). The float32 LoRA weights compute in the stream's dtype
    (:func:`helpers.lora.attach`), so their gradients and optimizer stay float32, as under
    autocast. float32 (CPU): no flag.
    """
    return {"bf16": False, "fp16": dtype == torch.float16 and torch.cuda.is_available()}


def uses_autocast(dtype: torch.dtype) -> bool:
    """Whether training in ``dtype`` runs under autocast (float16 on a GPU only; see
    :func:`precision_flags`), so evaluation and probes run the same way."""
    return precision_flags(dtype)["fp16"]


def dtype_reason(dtype: torch.dtype) -> str:
    """One sentence on why this dtype was chosen."""
    if not torch.cuda.is_available():
        return "no CUDA GPU: float32 on CPU (exact; bf16 autocast is slow on most processors)"
    name = torch.cuda.get_device_name(0)
    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    if dtype == torch.bfloat16:
        return (f"{name} has compute capability {cap} >= 8.0: native bfloat16 (no autocast; "
                "LoRA weights and optimizer in float32)")
    if dtype == torch.float16:
        return (f"{name} has compute capability {cap} < 8.0: bfloat16 would be emulated "
                "(slow), so float16 with loss scaling")
    return "float32 was asked for"


def versions() -> dict:
    """Installed versions of the key packages (None where missing)."""
    out = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- notebook 01's instruments


def requirement_check() -> list[dict]:
    """Installed versions of the key packages against the ranges this series was tested with."""
    from packaging.requirements import Requirement

    ranges = {req.name.lower(): req.specifier for req in map(Requirement, _requirements())}
    rows = []
    installed = versions()
    for name in KEY_PACKAGES:
        spec, have = ranges.get(name), installed[name]
        ok = have is not None and (spec is None or spec.contains(have.split("+")[0],
                                                                  prereleases=True))
        rows.append({"package": name, "installed": have, "tested": str(spec or "any"), "ok": ok})
    return rows


def _requirements() -> list[str]:
    """Tested ranges: from the installed distribution's metadata, else requirements.txt."""
    with contextlib.suppress(md.PackageNotFoundError):
        reqs = [r for r in md.requires("qlora-series") or [] if "extra ==" not in r]
        if reqs:
            return reqs
    path = Path(__file__).resolve().parent.parent / "requirements.txt"
    if not path.exists():
        return []
    lines = (ln.split("#")[0].strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln]


# The packages that must work together for the recipe (the setup cell checks them after an
# install, in a fresh process, before any notebook imports them).
STACK = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets")


def stack_problems() -> list[str]:
    """What stops the installed stack from working together, one sentence each (empty: none)."""
    rows = [r for r in requirement_check() if r["package"] in STACK and not r["ok"]]
    out = [f"{r['package']} {r['installed'] or '(missing)'} is outside the tested range "
           f"{r['tested']}" for r in rows]
    try:  # the imports the notebooks make; an incompatible pair fails here
        from peft import LoraConfig, PeftModel, get_peft_model  # noqa: F401
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        out.append(f"transformers and peft do not import together: {type(err).__name__}: {err}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m helpers.env``: the stack's versions, and whether they work together."""
    have = versions()
    print("installed: " + ", ".join(f"{k} {have.get(k)}" for k in STACK))
    problems = stack_problems()
    for line in problems:
        print(f"  problem: {line}")
    if problems:
        print("fix: pip install --upgrade transformers peft accelerate, then restart the runtime "
              "(Colab: Runtime > Restart session) and run the notebook from the top")
    return 1 if problems else 0


# Notebook 01's bitsandbytes self-test: a random 256 x 256 weight quantized to NF4 multiplies
# about 10% off the dense result; twice that means broken kernels, not rounding.
BNB_MAX_ERROR = 0.2


def verdict(requirements: list[dict], bnb_error: float, dtype: torch.dtype) -> str:
    """One sentence a person can act on, from :func:`requirement_check`, the relative error of
    notebook 01's 4-bit matmul (bitsandbytes itself raises, saying what to install, where it has
    no library for this machine) and the compute dtype. Introduced in notebook 01."""
    missing = [r["package"] for r in requirements if r["installed"] is None]
    if missing:
        return f"missing packages: pip install {' '.join(missing)}"
    if not bnb_error < BNB_MAX_ERROR:
        return (f"the 4-bit matmul is off by {bnb_error:.1%} (expected about 10%): reinstall "
                "bitsandbytes; `python -m bitsandbytes` diagnoses it")
    if not torch.cuda.is_available():
        hint = " on Colab choose Runtime > Change runtime type > T4 GPU" if (
            "google.colab" in sys.modules) else (
            " for real models use a CUDA GPU (Colab's free T4 is enough for 7B)")
        return ("no GPU: the embedded demo runs on CPU (4-bit layers work there, slowly; the "
                "paged optimizers run as their non-paged versions);" + hint)
    gpu = torch.cuda.get_device_properties(0)
    return (f"ready for 4-bit training on {gpu.name} ({gpu.total_memory / 1e9:.0f} GB, "
            f"capability {gpu.major}.{gpu.minor}, {str(dtype).replace('torch.', '')})")


def machine_info() -> dict:
    """A short description of the machine for the manifest's top level (notebook 01 and
    ``python -m helpers.run`` record it): CPU model and cores, the first GPU and how many."""
    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_name(), "cpu_cores": os.cpu_count(),
        "gpu": gpu.name if gpu else None, "gpu_count": torch.cuda.device_count(),
        "gpu_total_bytes": gpu.total_memory if gpu else 0,
        "platform": platform.platform(),
    }


def _cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; ``platform.processor()`` there gives
    only the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def world() -> dict:
    """This process's place in a launch: ``rank``, ``local_rank``, ``world_size``,
    ``local_world_size`` (1 process: 0, 0, 1, 1), ``fsdp`` and ``offload`` (the FSDP config's
    ``fsdp_offload_params``, which accelerate launch passes as ``FSDP_OFFLOAD_PARAMS``).

    Read from the variables torchrun / ``accelerate launch`` set, with accelerate's own reader,
    not from ``accelerate.PartialState``: building that state joins the process group and binds
    a GPU per local rank, and the launch plan (:func:`helpers.scaling.check_plan`) must be able
    to refuse, say, 4 processes on 2 GPUs before that happens; a plain process stays cheap.
    """
    from accelerate.utils import get_int_from_env

    size = get_int_from_env(["WORLD_SIZE"], 1)
    fsdp = fsdp_active()
    return {"rank": get_int_from_env(["RANK"], 0),
            "local_rank": get_int_from_env(["LOCAL_RANK"], 0), "world_size": size,
            "local_world_size": get_int_from_env(["LOCAL_WORLD_SIZE"], size),
            "fsdp": fsdp, "offload": fsdp and flag("FSDP_OFFLOAD_PARAMS")}


def is_main_process() -> bool:
    """True in a single process and in rank 0 of a launch: the one that writes files
    (``accelerate.PartialState().is_main_process``, the state the Trainer shares)."""
    from accelerate import PartialState

    return PartialState().is_main_process


# ---------------------------------------------------------------- memory budgets, GPU and host


def _read_int(path: str) -> int | None:
    """The integer in a one-line system file (cgroup limits), None when absent or unlimited."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def host_memory() -> dict:
    """This machine's RAM as a process sees it, in bytes: ``total`` (``/proc/meminfo`` MemTotal,
    else psutil), ``available`` (MemAvailable: what can be had without swapping),
    ``cgroup_limit`` (the container's limit, cgroup v2 or v1; None without one) and ``limit``,
    the smaller of total and the cgroup limit: what the process may use at most. A free Colab
    runtime has a total of about 12.7 GB."""
    info = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                info[key] = int(rest.split()[0]) * 1024
    if len(info) < 2:
        import psutil

        vm = psutil.virtual_memory()
        info = {"MemTotal": vm.total, "MemAvailable": vm.available}
    cgroup = _read_int("/sys/fs/cgroup/memory.max")
    if cgroup is None:
        cgroup = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if cgroup is not None and cgroup >= info["MemTotal"]:
        cgroup = None  # v1 writes a huge number for no limit
    limit = min(info["MemTotal"], cgroup or info["MemTotal"])
    return {"total": info["MemTotal"], "available": min(info["MemAvailable"], limit),
            "cgroup_limit": cgroup, "limit": limit}


def host_budget_bytes(budget_gb: float = 0.0) -> int:
    """The host-RAM budget (HOST_MEMORY_BUDGET_GB; 0 = detected: :func:`host_memory`'s limit).
    The process's resident memory must stay below it: a Colab runtime that exceeds its RAM is
    killed."""
    return int(budget_gb * 1e9) if budget_gb > 0 else host_memory()["limit"]


def host_rss() -> int:
    """This process's resident memory now, in bytes (Linux's VmRSS, else psutil's)."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


_HOST_PEAK_SCOPED = {"notebook": False}  # whether the last restart took (Linux's clear_refs)


def _status_kb(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_host_rss(restart: bool = False) -> int:
    """This process's resident-memory high-water mark in bytes: Linux's VmHWM, which
    ``restart=True`` sets back to the current RSS (a notebook's start, so that a notebook run
    again in the same kernel is measured alone); elsewhere ``ru_maxrss``, the process's lifetime
    peak. :func:`host_peak_is_scoped` says whether the restart took."""
    if restart:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    hwm = _status_kb("VmHWM")
    if restart:
        # right after a restart the mark is the current RSS; a kernel that ignores the request
        # (or has no /proc) leaves the lifetime peak there
        rss = _status_kb("VmRSS")
        _HOST_PEAK_SCOPED["notebook"] = bool(hwm and rss and hwm <= rss + 32 * 1024)
    if hwm is not None:
        return hwm * 1024
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        import psutil

        return psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports kB


def host_peak_is_scoped() -> bool:
    """Whether :func:`peak_host_rss` measures from its last restart (True) or is the process's
    lifetime peak (False: no ``/proc/self/clear_refs`` here, so a notebook run after a larger
    one in the same kernel reports the larger peak; an over-report, never an under-report)."""
    return _HOST_PEAK_SCOPED["notebook"]


_GPU_PEAK: dict = {}  # device index -> the largest peak seen before a reset


def reset_gpu_peak(device=None) -> None:
    """Reset torch's peak-allocation counter for a new measurement (a tracked stage, a probe)
    while keeping what it had reached for :func:`gpu_peak_allocated`, the notebook's peak."""
    if not torch.cuda.is_available():
        return
    if device is None or isinstance(device, int):
        index = torch.cuda.current_device() if device is None else device
    else:
        index = torch.device(device).index or 0
    _GPU_PEAK[index] = max(_GPU_PEAK.get(index, 0), torch.cuda.max_memory_allocated(index))
    torch.cuda.reset_peak_memory_stats(index)


def gpu_peak_allocated(restart: bool = False) -> int:
    """The peak GPU memory allocated by torch in this process, over every GPU it used, since the
    last ``restart=True`` (a notebook's start), across the resets of :func:`reset_gpu_peak`;
    0 without CUDA."""
    if not torch.cuda.is_available():
        return 0
    if restart:
        _GPU_PEAK.clear()
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
        return 0
    peaks = [max(_GPU_PEAK.get(i, 0), torch.cuda.max_memory_allocated(i))
             for i in range(torch.cuda.device_count())]
    return max(peaks, default=0)


def enforce_gpu_budget(budget: int, device: int | None = None) -> str:
    """Cap torch's allocator so that this process uses at most ``budget`` bytes of the card,
    counting what is already held outside the allocator (CUDA context, libraries); a budget not
    below the card's memory lifts an earlier cap. Returns a sentence saying what was done. Every
    notebook applies MEMORY_BUDGET_GB this way at its start (:func:`helpers.config.start`)."""
    gpu = torch.cuda.current_device() if device is None else device
    available, total = torch.cuda.mem_get_info(gpu)
    if budget <= 0 or budget >= total:
        torch.cuda.set_per_process_memory_fraction(1.0, gpu)
        return (f"MEMORY_BUDGET_GB={budget / 1e9:.1f} is not below the card's "
                f"{total / 1e9:.1f} GB: nothing to enforce")
    outside = max(0, (total - available) - torch.cuda.memory_reserved(gpu))
    fraction = max(0.01, (budget - outside) / total)
    torch.cuda.set_per_process_memory_fraction(fraction, gpu)
    return (f"budget enforced: torch may allocate {fraction * total / 1e9:.2f} GB of this "
            f"{total / 1e9:.1f} GB card ({budget / 1e9:.1f} GB budget less "
            f"{outside / 1e9:.2f} GB of CUDA context), as on "
            f"{units.article(round(budget / 1e9))} {budget / 1e9:.0f} GB card")


if __name__ == "__main__":
    raise SystemExit(main())
