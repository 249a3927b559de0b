"""Held-out loss against training tokens: the original recipe and notebook 05's defaults, on the
embedded model and data, for the same number of training tokens.

    python bench/bench_curves.py [--tokens 40000] [--every 4000]

Writes bench/results/curves.json and bench/curves.png. Both runs use the series' collator (EOS
kept in the labels), so the comparison is of the training recipe only: the original's batch 1 x
accumulation 4, learning rate 2e-4, LoRA r=8 alpha=32 on the attention projection, fp32 upcast by
prepare_model_for_kbit_training and no packing, against the defaults (LoRA r=16 on all linear
layers, learning rate from the model's width, packed 128-token blocks, micro-batch from the budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import Trainer, TrainerCallback, set_seed  # noqa: E402

from helpers import budget, config, data, env, loading, lora, losses, plots, train  # noqa: E402


class EvalEvery(TrainerCallback):
    """Held-out loss each time another ``every`` real tokens have been trained on."""

    def __init__(self, model, eval_ds, collator, every, limit, points):
        self.model, self.eval_ds, self.collator = model, eval_ds, collator
        self.every, self.limit, self.points, self.next = every, limit, points, every

    def on_step_end(self, args, state, control, **kw):
        seen = state.num_input_tokens_seen
        if seen >= self.next or seen >= self.limit:
            loss, _ = train.evaluate_loss(self.model, self.eval_ds, self.collator, batch_size=16)
            self.model.train()
            self.points.append((int(seen), float(loss)))
            self.next = seen + self.every
        if seen >= self.limit:
            control.should_training_stop = True


def run_defaults(tokens, every, run_dir):
    cfg = config.make_config(RUN_DIR=str(run_dir / "defaults"), MAX_STEPS=100000, SAVE_STEPS=0)
    set_seed(cfg.seed)
    tok = loading.load_tokenizer(cfg.model)
    model = loading.load_model(cfg.model, tokenizer=tok)
    lora.prepare_for_training(model, cfg.gradient_checkpointing, False)
    model = lora.attach(model, cfg)
    prepared = data.prepare(cfg, tok)
    collator = data.CompletionCollator(tok)
    if cfg.chunked_loss:
        losses.use_chunked_loss(model)
    micro, _ = budget.choose_micro_batch(cfg, model, probe=False)
    cfg = dataclasses.replace(cfg, learning_rate=train.auto_learning_rate(model))
    points = [(0, train.evaluate_loss(model, prepared.eval, collator, batch_size=16)[0])]
    trainer = train.make_trainer(cfg, model, tok, prepared.train, collator, micro)
    trainer.add_callback(EvalEvery(model, prepared.eval, collator, every, tokens, points))
    trainer.train()
    return points


def run_original(tokens, every, run_dir):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import TrainingArguments

    cfg = config.make_config(RUN_DIR=str(run_dir / "original"), PACKING=False)
    set_seed(cfg.seed)
    tok = loading.load_tokenizer(cfg.model)
    model = loading.load_model(cfg.model, tokenizer=tok)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["query_key_value"], bias="none",
                                             task_type="CAUSAL_LM"))
    prepared = data.prepare(cfg, tok)
    collator = data.CompletionCollator(tok)
    flags = env.precision_flags(env.compute_dtype())
    args = TrainingArguments(output_dir=cfg.run_dir, per_device_train_batch_size=1,
                             gradient_accumulation_steps=4, warmup_steps=2, max_steps=100000,
                             learning_rate=2e-4, logging_steps=50, optim="paged_adamw_8bit",
                             report_to=[], save_strategy="no", remove_unused_columns=False,
                             use_cpu=not env.torch.cuda.is_available(),
                             fp16=flags["bf16"] or flags["fp16"], seed=cfg.seed,
                             include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=prepared.train,
                      data_collator=collator, processing_class=tok)
    points = [(0, train.evaluate_loss(model, prepared.eval, collator, batch_size=16)[0])]
    trainer.add_callback(EvalEvery(model, prepared.eval, collator, every, tokens, points))
    trainer.train()
    return points


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=40000)
    ap.add_argument("--every", type=int, default=4000)
    ap.add_argument("--run-dir", default="runs/bench-curves")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    started = time.time()
    curves = {"defaults": run_defaults(args.tokens, args.every, run_dir),
              "original": run_original(args.tokens, args.every, run_dir)}
    result = {"tokens": args.tokens, "every": args.every, "curves": curves,
              "machine": env.machine_info(), "versions": env.versions(),
              "seconds": round(time.time() - started, 1)}
    out = ROOT / "bench" / "results" / "curves.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("real training tokens seen")
    ax.set_ylabel("held-out loss")
    ax.set_title("Embedded model and quotations: original recipe vs defaults")
    ax.legend()
    plots.save(fig, ROOT / "bench" / "curves.png")
    for name, pts in curves.items():
        print(name, " ".join(f"{t}:{loss:.3f}" for t, loss in pts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
