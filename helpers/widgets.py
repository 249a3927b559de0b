"""ipywidgets controls with static twins: when no front end is attached (papermill, CI, a plain
Python process) every control renders a static table or figure instead.
"""

from __future__ import annotations

from helpers import env


_SEQ_CHOICES = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_BATCH_CHOICES = (1, 2, 4, 8, 16, 32, 64)
_RANK_CHOICES = (4, 8, 16, 32, 64, 128)


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


class Calculation(dict):
    """The calculator's static twin: ``estimate``, ``verdict`` and ``figure``. As a cell's value
    it shows the verdict, the item table and the chart; as text, the verdict and the table."""

    def _ipython_display_(self):
        from IPython.display import Markdown, display

        est = self["estimate"]
        display(Markdown(f"**Will it fit?** {self['verdict']}  \n{est.text().splitlines()[0]}"),
                est.frame(), self["figure"])

    def __repr__(self) -> str:
        return f"Will it fit? {self['verdict']}\n{self['estimate'].text()}"


def memory_calculator(presets=None, *, model: str | None = None, gpu_gb: float | None = None,
                      seq_len: int = 512, micro_batch: int = 1, lora_r: int = 16,
                      gradient_checkpointing: bool = True, **settings):
    """"Will it fit?": pick a model preset, the card's memory, sequence length, micro-batch,
    LoRA rank and checkpointing; a stacked bar chart of the predicted memory and a one-line
    verdict follow every change.

    ``presets``: name -> ModelShape / config / config dict (default: ``helpers.shapes.PRESETS``,
    the JSON configs in ``helpers/configs/``). ``gpu_gb``: default this machine's GPU, else 16
    (a T4). Other ``settings`` go to :func:`helpers.estimator.estimate` (optimizer, upcast_fp32...).
    Without a front end (papermill, CI, a plain process) it shows the verdict, the item table
    and the chart for the given settings, and returns them as a dict (``estimate``,
    ``verdict``, ``figure``: a :class:`Calculation`, which shows as the twin when it is a cell's
    value); with one it returns the widget. Introduced in notebook 02.
    """
    import dataclasses

    import torch
    from IPython.display import display

    from helpers import budget, estimator, shapes, plots

    source = shapes.PRESETS if presets is None else presets
    shapes = {name: dataclasses.replace(shapes.as_shape(cfg), name=name)
              for name, cfg in dict(source).items()}
    if not shapes:
        raise ValueError("no model presets to choose from: pass presets={'name': config, ...} "
                         "or add transformers config JSON files to helpers/configs/")
    if model is not None and model not in shapes:
        raise ValueError(f"model {model!r} is not among the presets: {', '.join(shapes)}")
    model = model or next(iter(shapes))
    if gpu_gb is None:
        gpu_gb = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1) \
            if torch.cuda.is_available() else 16.0

    def compute(name, gb, seq, mb, r, gc):
        est = estimator.estimate(shapes[name], seq_len=seq, micro_batch=mb, lora_r=r,
                              gradient_checkpointing=gc, **settings)
        verdict = budget.verdict_text(est, gb * 1e9)
        fig = plots.memory_bars({f"{name}\n{seq} x {mb}": est}, budget_bytes=gb * 1e9,
                                title=verdict)
        return est, verdict, fig

    if not env.has_frontend():
        est, verdict, fig = compute(model, gpu_gb, seq_len, micro_batch, lora_r,
                                    gradient_checkpointing)
        result = Calculation(estimate=est, verdict=verdict, figure=fig)
        if not _in_ipython():
            print(result)  # a plain process: the text twin, now
        return result

    import ipywidgets as w

    ctrl = {
        "name": w.Dropdown(options=list(shapes), value=model, description="model"),
        "gb": w.BoundedFloatText(value=gpu_gb, min=1, max=2000, step=1,
                                 description="GPU GB"),
        "seq": w.Dropdown(options=sorted(set(_SEQ_CHOICES) | {seq_len}), value=seq_len,
                          description="seq len"),
        "mb": w.Dropdown(options=sorted(set(_BATCH_CHOICES) | {micro_batch}),
                         value=micro_batch, description="micro-batch"),
        "r": w.Dropdown(options=sorted(set(_RANK_CHOICES) | {lora_r}), value=lora_r,
                        description="LoRA r"),
        "gc": w.Checkbox(value=gradient_checkpointing, description="gradient checkpointing"),
    }

    def redraw(name, gb, seq, mb, r, gc):
        _, verdict, fig = compute(name, gb, seq, mb, r, gc)
        display(fig)
        print(verdict)

    out = w.interactive_output(redraw, ctrl)  # redrawn on every change
    return w.VBox([w.HBox([ctrl["name"], ctrl["gb"], ctrl["gc"]]),
                   w.HBox([ctrl["seq"], ctrl["mb"], ctrl["r"]]), out])
