"""How long notebook 04's dataset preparation takes for 100,000 short examples.

Builds quote-like examples by recombining the embedded quotations (the first half of one quote,
the second half of another, a third one's author: about 30 tokens each), writes them as a .jsonl
file and times ``helpers.data.prepare`` on it (load, check, split, format, tokenize with EOS and
labels, statistics; packing with ``--packing``), then ``helpers.data.save``. The tokenizer is the
embedded model's when it has been built, else a byte-level BPE trained here on the quotes.

    python bench/bench_data_prep.py [--examples 100000] [--max-length 128] [--packing]

Prints the figures, writes them to ``bench/results/data_prep.json`` and adds a row to the
"Data preparation" section of ``bench/RESULTS.md``. The target: at most 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTION = "## Data preparation"
HEADER = ("| date | machine | versions | command | examples | prepare s | save s | notes |\n"
          "|---|---|---|---|---|---|---|---|")


def synthetic_rows(quotes: list, n: int, seed: int = 0) -> list:
    """``n`` quote-like rows: halves of two different quotes and a third quote's author."""
    rng = random.Random(seed)
    words = [q["quote"].split() for q in quotes]
    rows = []
    for _ in range(n):
        a, b, c = rng.randrange(len(quotes)), rng.randrange(len(quotes)), rng.randrange(len(quotes))
        head, tail = words[a][: max(1, len(words[a]) // 2)], words[b][len(words[b]) // 2:]
        rows.append({"quote": " ".join(head + tail), "author": quotes[c]["author"],
                     "tags": quotes[a]["tags"][:2]})
    return rows


def bench_tokenizer(quotes: list):
    """The embedded model's tokenizer when built, else a byte-level BPE trained on the quotes."""
    try:
        from helpers import embedded

        path = Path(embedded.embedded_path())
        if path.exists():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path)), f"embedded ({path.name})"
    except (ImportError, AttributeError, OSError, ValueError):
        pass
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([f"{q['quote']} ({q['author']})" for q in quotes], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    return fast, f"byte-level BPE trained on the quotes ({len(fast)} tokens)"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def versions() -> str:
    names = ("datasets", "tokenizers", "transformers", "pyarrow")
    return ", ".join(f"{n} {md.version(n)}" for n in names) + f", Python {platform.python_version()}"


def add_row(results_md: Path, row: str) -> None:
    """Append ``row`` to the table of the "Data preparation" section (created if missing)."""
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    lines = text.rstrip("\n").split("\n")
    if SECTION not in lines:
        intro = ("`python bench/bench_data_prep.py`: `helpers.data.prepare` on 100,000 short "
                 "quote-like examples (target: at most 30 s on 2 cores).")
        lines += ["", SECTION, "", intro, "", *HEADER.split("\n")]
        lines.append(row)
    else:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        table = [i for i in range(start, end) if lines[i].startswith("|")]
        at = (table[-1] + 1) if table else end
        if not table:
            lines[at:at] = HEADER.split("\n")
            at += 2
        lines.insert(at, row)
    results_md.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--note", default="", help="added to the RESULTS.md row")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)

    # as in the notebooks, whose first cell sets it (helpers.config.start)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    from helpers import data, formats
    from helpers.config import make_config

    datasets.disable_progress_bars()
    quotes = [json.loads(line) for line in formats.EMBEDDED_QUOTES.read_text().splitlines() if line]
    tokenizer, tokenizer_name = bench_tokenizer(quotes)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "synthetic_quotes.jsonl"
        with source.open("w") as f:
            for row in synthetic_rows(quotes, args.examples):
                f.write(json.dumps(row) + "\n")
        cfg = make_config(DATASET=str(source), RUN_DIR=str(Path(tmp) / "run"),
                          MAX_LENGTH=args.max_length, PACKING=args.packing)
        load_before = os.getloadavg()[0]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        prepared = data.prepare(cfg, tokenizer)
        prepare_s = time.perf_counter() - wall0
        cpu_s = time.process_time() - cpu0
        t = time.perf_counter()
        data.save(prepared, cfg.run_dir)
        save_s = time.perf_counter() - t
        load_after = os.getloadavg()[0]
    m = prepared.metrics()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "versions": versions(),
        "command": "python bench/bench_data_prep.py " + " ".join(argv or sys.argv[1:]),
        "tokenizer": tokenizer_name, "examples": args.examples, "max_length": args.max_length,
        "packing": args.packing, "prepare_seconds": round(prepare_s, 2),
        "prepare_cpu_seconds": round(cpu_s, 2), "save_seconds": round(save_s, 2),
        "load_average_before": round(load_before, 2), "load_average_after": round(load_after, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        "metrics": m,
    }
    print(json.dumps(result, indent=1))
    if args.no_record:
        return result
    out = HERE / "results" / "data_prep.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    busy = max(load_before, load_after) > 1.0
    notes = [(f"{tokenizer_name}; mean {m['mean_tokens']} tokens/example; "
              f"{'packed' if args.packing else 'not packed'}; process CPU {cpu_s:.1f} s"),
             f"load average {load_before:.1f} -> {load_after:.1f}"
             + (" (CPU shared with other work: contention)" if busy else "")]
    if args.note:
        notes.append(args.note)
    row = (f"| {result['date']} | {result['machine']} | {result['versions']} | "
           f"`{result['command'].strip()}` | {args.examples:,} | {prepare_s:.1f} | {save_s:.2f} | "
           f"{'; '.join(notes)} |")
    add_row(HERE / "RESULTS.md", row)
    print(f"wrote {out.relative_to(HERE.parent)} and a row in bench/RESULTS.md")
    return result


if __name__ == "__main__":
    main()
