"""helpers: the small package behind the QLoRA notebook series.

One module per concept, bottom to top (a module imports only those before it; the README's
layout table lists them with what each owns): ``units``, ``tokens``, ``env`` (01), ``rundir``,
``manifest`` and ``config`` (every notebook), ``shapes``, ``footprint``, ``estimator``,
``scaling``, ``budget`` (02, 05), the model modules (02), ``lora`` (03), ``formats`` and
``data`` (04), the training modules (05: ``losses``, ``attention``, ``offload`` with ``norms``, ``tiling``, ...), generation,
``adapters``, ``streammerge`` and ``merge`` (06), ``widgets``, and the runner: ``nbtools`` and ``run``, the main job that executes
the series with papermill.
"""

__version__ = "0.1.0"

# Where the series lives; the notebooks' setup cell and Colab badges use the same values
# (a test checks that they agree).
GITHUB_REPOSITORY = "qlora-series/qlora-series"
REVISION = "main"
NOTEBOOKS = (
    "01_environment_and_cuda",
    "02_load_in_4bit",
    "03_lora_setup",
    "04_dataset_preparation",
    "05_paged_optimizer_training",
    "06_inference_and_merge",
)

_MODULES = ("units", "tokens", "env", "rundir", "config", "manifest", "footprint", "shapes",
            "estimator", "scaling", "budget", "embedded", "models", "rehearsal", "loading", "lora",
            "formats", "data", "losses", "attention", "norms", "offload", "tiling", "plots", "callbacks", "checkpoints", "fsdp",
            "train", "generate", "adapters", "streammerge", "merge", "widgets", "nbtools", "run")


def __getattr__(name):
    """``helpers.env`` etc. import on first use, so ``import helpers`` stays light."""
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"helpers.{name}")
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")
