"""helpers.data: sources, formats, EOS and label masks, truncation, packing, collator, reuse."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from helpers import data, formats
from helpers.config import ConfigError, make_config

EOS, PAD = "<|endoftext|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}{{ m['content'] }}<|im_end|>"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}"
    "{% endif %}"
)
QUOTES = [
    {"quote": "Be yourself; everyone else is already taken.", "author": "Oscar Wilde",
     "tags": ["self"]},
    {"quote": "The only thing we have to fear is fear itself.", "author": "Franklin Roosevelt",
     "tags": ["fear"]},
    {"quote": "To be, or not to be, that is the question.", "author": "William Shakespeare",
     "tags": ["life"]},
    {"quote": "I think, therefore I am.", "author": "Rene Descartes", "tags": []},
    {"quote": "Knowledge is power.", "author": "Francis Bacon", "tags": ["power"]},
    {"quote": "The unexamined life is not worth living.", "author": "Socrates", "tags": ["life"]},
    {"quote": "Brevity is the soul of wit.", "author": "William Shakespeare", "tags": []},
    {"quote": "Fortune favours the bold.", "author": "Virgil", "tags": ["courage"]},
    {"quote": "Time is money.", "author": "Benjamin Franklin", "tags": ["time"]},
    {"quote": "Well done is better than well said.", "author": "Benjamin Franklin", "tags": []},
]
INSTRUCTIONS = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say something kind.", "input": None, "output": "You are doing well."},
]
CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "What is fear?"},
                  {"role": "assistant", "content": "A feeling."},
                  {"role": "user", "content": "And time?"},
                  {"role": "assistant", "content": "Money, some say."}]},
]


def _train_tokenizer(chat_template=CHAT_TEMPLATE, pad=PAD):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"{q['quote']} ({q['author']})" for q in QUOTES] * 20
    corpus += [formats.instruction_prompt(r["instruction"], r["input"] or "") + r["output"]
               for r in INSTRUCTIONS] * 20
    corpus += ["The quick brown fox jumps over the lazy dog."] * 20
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOS, PAD, "<|im_start|>",
                                                                   "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=pad,
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    out.chat_template = chat_template
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, dataset, **kw):
    kw.setdefault("MAX_LENGTH", 64)
    kw.setdefault("PACKING", False)  # the series packs by default; these tests look at examples
    return make_config(DATASET=str(dataset), RUN_DIR=str(tmp_path / "run"), **kw)


# ---------------------------------------------------------------------------------------------
# sources


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_each_file_type_loads_and_prepares(tmp_path, tokenizer, ext):
    import pandas as pd

    path = tmp_path / f"quotes.{ext}"
    frame = pd.DataFrame([{k: v for k, v in q.items() if k != "tags"} for q in QUOTES])
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "json": lambda: path.write_text(json.dumps(frame.to_dict("records"))),
     "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[ext]()
    source = formats.load_source(_cfg(tmp_path, path))
    assert len(source["train"]) == len(QUOTES)
    assert {"quote", "author"} <= set(source["train"].column_names)
    prepared = data.prepare(_cfg(tmp_path, path), tokenizer)
    m = prepared.metrics()
    assert m["train_examples"] + m["eval_examples"] == len(QUOTES)
    assert m["eval_examples"] == 1  # 10% of 10, seeded


def test_txt_is_one_example_per_line(tmp_path, tokenizer):
    path = tmp_path / "lines.txt"
    path.write_text("First line of text.\n\nSecond line here.\nThird one.\n")
    source = formats.load_source(_cfg(tmp_path, path))
    assert source["train"]["text"] == ["First line of text.", "Second line here.", "Third one."]
    cfg = _cfg(tmp_path, path, DATA_FORMAT="text", TEXT_COLUMN="text", EVAL_FRACTION=0)
    prepared = data.prepare(cfg, tokenizer)
    first = prepared.train[0]["input_ids"]
    assert tokenizer.decode(first) == "First line of text." + EOS


def test_local_folder_in_hub_layout_uses_its_own_test_split(tmp_path, tokenizer):
    folder = tmp_path / "hub_dataset"
    (folder / "data").mkdir(parents=True)
    _jsonl(folder / "data" / "train.jsonl", QUOTES[:8])
    _jsonl(folder / "data" / "test.jsonl", QUOTES[8:])
    cfg = _cfg(tmp_path, folder)
    source = formats.load_source(cfg)
    assert set(source) == {"train", "test"}
    prepared = data.prepare(cfg, tokenizer)
    assert prepared.metrics()["train_examples"] == 8
    assert prepared.metrics()["eval_examples"] == 2
    assert prepared.stats["eval_from"] == "source split"
    with pytest.raises(formats.DatasetError, match="DATASET_SPLIT"):
        formats.load_source(_cfg(tmp_path, folder, DATASET_SPLIT="nope"))


def test_unreachable_hub_says_what_to_do(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(formats.DatasetError) as err:
        formats.load_source(_cfg(tmp_path, "someone/some_quotes"))
    assert "Hub" in str(err.value) and 'DATASET="embedded"' in str(err.value)


def test_embedded_quotes_load(tmp_path, tokenizer):
    if not formats.EMBEDDED_QUOTES.exists():
        pytest.skip("the embedded quotes file is not there yet")
    source = formats.load_source(_cfg(tmp_path, "embedded"))
    train = source["train"]
    assert len(train) >= 400
    assert {"quote", "author", "tags"} <= set(train.column_names)
    prepared = data.prepare(_cfg(tmp_path, "embedded", MAX_EXAMPLES=50), tokenizer)
    assert prepared.metrics()["train_examples"] + prepared.metrics()["eval_examples"] == 50


# ---------------------------------------------------------------------------------------------
# formats, EOS, masks


def test_template_format_and_eos_label_in_every_example(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "q.jsonl", QUOTES)
    prepared = data.prepare(_cfg(tmp_path, path, EVAL_FRACTION=0), tokenizer)
    eos = tokenizer.eos_token_id
    texts = {f"{q['quote']} ({q['author']})" for q in QUOTES}
    for row in prepared.train:
        ids, labels = row["input_ids"], row["labels"]
        assert ids[-1] == eos and labels[-1] == eos  # EOS kept, and it counts
        assert labels == ids  # template format: everything is trained
        assert tokenizer.decode(ids[:-1]) in texts
    m = prepared.metrics()
    assert m["train_tokens"] == sum(len(r["input_ids"]) for r in prepared.train)
    assert m["train_loss_tokens"] == m["train_tokens"] - m["train_examples"]  # first never predicted


def test_text_format_uses_the_column(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "q.jsonl", QUOTES)
    cfg = _cfg(tmp_path, path, DATA_FORMAT="text", TEXT_COLUMN="quote", EVAL_FRACTION=0)
    prepared = data.prepare(cfg, tokenizer)
    assert tokenizer.decode(prepared.train[0]["input_ids"]) == QUOTES[0]["quote"] + EOS


def test_instruction_response_only_masks_the_prompt(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "ins.jsonl", INSTRUCTIONS)
    cfg = _cfg(tmp_path, path, DATA_FORMAT="instruction", EVAL_FRACTION=0)
    prepared = data.prepare(cfg, tokenizer)
    eos = tokenizer.eos_token_id
    for src, row in zip(INSTRUCTIONS, prepared.train):
        prompt = formats.instruction_prompt(src["instruction"], src["input"] or "")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(src["output"], add_special_tokens=False)["input_ids"]
        ids, labels = row["input_ids"], row["labels"]
        assert ids == prompt_ids + response_ids + [eos]  # prompt tokens as at generation time
        assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)  # no prompt token counts
        assert labels[len(prompt_ids):] == response_ids + [eos]  # every response token and EOS
    assert "### Input:" not in formats.instruction_prompt("x", None or "")
    cfg_all = _cfg(tmp_path, path, DATA_FORMAT="instruction", EVAL_FRACTION=0,
                   RESPONSE_ONLY=False)
    for row in data.prepare(cfg_all, tokenizer).train:
        assert row["labels"] == row["input_ids"]


def test_boundary_inside_a_word_never_merges_across_pieces(tokenizer):
    """A BPE merge across the prompt/response boundary would put response characters in a prompt
    token (or the reverse); pieces are tokenized apart, so the boundary is always a token edge."""
    from datasets import Dataset

    prompt, response = "The quick bro", "wn fox jumps"
    joint = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    apart = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    offsets = tokenizer(prompt + response, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    assert any(s < len(prompt) < e for s, e in offsets), "the fixture should merge across"
    formatted = Dataset.from_dict({"pieces": [[prompt, response]], "trained": [[False, True]]})
    row = data.tokenize_examples(formatted, tokenizer, max_length=64)[0]
    assert row["input_ids"][: len(apart)] == apart
    assert row["labels"][: len(apart)] == [-100] * len(apart)
    assert all(y != -100 for y in row["labels"][len(apart):])
    assert tokenizer.decode(row["input_ids"]) == prompt + response + EOS
    assert row["input_ids"] != joint + [tokenizer.eos_token_id]


@pytest.mark.parametrize("own_template", [True, False])
def test_chat_format_trains_only_assistant_turns(tmp_path, own_template):
    tok = _train_tokenizer(chat_template=CHAT_TEMPLATE if own_template else None)
    path = _jsonl(tmp_path / "chat.jsonl", CHATS)
    prepared = data.prepare(_cfg(tmp_path, path, DATA_FORMAT="chat", EVAL_FRACTION=0,
                                 MAX_LENGTH=256), tok)
    eos = tok.eos_token_id
    for src, row in zip(CHATS, prepared.train):
        ids, labels = row["input_ids"], row["labels"]
        trained = tok.decode([t for t, y in zip(ids, labels) if y != -100])
        context = tok.decode([t for t, y in zip(ids, labels) if y == -100])
        for m in src["messages"]:
            assert m["content"] in (trained if m["role"] == "assistant" else context)
            assert m["content"] not in (context if m["role"] == "assistant" else trained)
        assert ids[-1] == eos and labels[-1] == eos
        assert ids.count(eos) == (sum(m["role"] == "assistant" for m in src["messages"])
                                  if not own_template else 1)
    text = tok.decode(prepared.train[0]["input_ids"])
    assert ("<|im_start|>assistant" if own_template else "<|assistant|>") in text


def test_chat_ending_with_a_user_turn_does_not_teach_a_stop_there(tokenizer):
    from datasets import Dataset

    messages = CHATS[1]["messages"][:3]  # user, assistant, user
    pieces, trained = formats.chat_pieces(messages, tokenizer)
    assert trained == [False, True, False] and "".join(pieces).endswith("And time?<|im_end|>\n")
    row = data.tokenize_examples(Dataset.from_dict({"pieces": [pieces], "trained": [trained]}),
                                 tokenizer, max_length=128, add_leading_special=False)[0]
    assert row["input_ids"][-1] == tokenizer.eos_token_id and row["labels"][-1] == -100


def test_truncation_drops_eos_and_is_counted(tmp_path, tokenizer):
    long = {"quote": " ".join(["The quick brown fox jumps over the lazy dog."] * 6),
            "author": "Anon", "tags": []}
    path = _jsonl(tmp_path / "q.jsonl", QUOTES[:4] + [long])
    cfg = _cfg(tmp_path, path, MAX_LENGTH=24, EVAL_FRACTION=0)
    prepared = data.prepare(cfg, tokenizer)
    full = len(tokenizer(f"{long['quote']} (Anon)", add_special_tokens=False)["input_ids"]) + 1
    m = prepared.metrics()
    assert m["truncated_examples"] == 1
    assert m["truncated_tokens"] == full - 24
    assert m["max_tokens"] == full
    cut = prepared.train[4]
    assert len(cut["input_ids"]) == 24 and cut["input_ids"][-1] != tokenizer.eos_token_id
    for row in list(prepared.train)[:4]:
        assert row["labels"][-1] == tokenizer.eos_token_id


def test_truncation_that_leaves_no_response_drops_the_example_and_says_so(tmp_path, tokenizer):
    rows = INSTRUCTIONS[:3] + [{"instruction": "Repeat. " * 40, "input": "", "output": "No."}]
    path = _jsonl(tmp_path / "ins.jsonl", rows)
    cfg = _cfg(tmp_path, path, DATA_FORMAT="instruction", MAX_LENGTH=40, EVAL_FRACTION=0)
    m = data.prepare(cfg, tokenizer).metrics()
    assert m["dropped_examples"] == 1 and m["train_examples"] == 3
    assert m["truncated_examples"] == 1


# ---------------------------------------------------------------------------------------------
# packing and the collator


def test_packing_keeps_every_token(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "q.jsonl", QUOTES * 3)
    plain = data.prepare(_cfg(tmp_path, path, MAX_LENGTH=40, EVAL_FRACTION=0), tokenizer)
    packed = data.prepare(_cfg(tmp_path, path, MAX_LENGTH=40, EVAL_FRACTION=0, PACKING=True),
                          tokenizer)
    m, before = packed.metrics(), plain.metrics()
    tokens_in = sum(len(r["input_ids"]) for r in plain.train)
    tokens_out = sum(len(r["input_ids"]) for r in packed.train)
    assert tokens_in == tokens_out + m["packing_dropped_tokens"] and m["packing_dropped_tokens"] == 0
    assert m["train_tokens"] == tokens_in and m["train_rows"] < m["train_examples"] == 30
    # the loss sees the same tokens: each example's first label is never predicted, packed or not
    assert m["train_loss_tokens"] == before["train_loss_tokens"]
    assert m["train_loss_tokens"] == sum(sum(y != -100 for y in r["labels"]) for r in packed.train)
    examples_in = [(r["input_ids"], [-100] + r["labels"][1:]) for r in plain.train]
    examples_out = []
    eos = tokenizer.eos_token_id
    for row in packed.train:
        assert len(row["input_ids"]) <= 40
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0
        for s in starts[1:]:  # the example before each restart ended with a labelled EOS
            assert row["input_ids"][s - 1] == eos and row["labels"][s - 1] == eos
        for a, b in zip(starts, starts[1:] + [len(row["input_ids"])]):
            assert row["position_ids"][a:b] == list(range(b - a))
            examples_out.append((row["input_ids"][a:b], row["labels"][a:b]))
    assert sorted(examples_out) == sorted(examples_in)  # whole examples, each once, labels kept


def test_packing_fills_the_blocks():
    """Best-fit decreasing: no block over the limit, every example once, and the blocks nearly
    full: the embedded quotes at 512 tokens fill one block more than their tokens need at least,
    98.1% real tokens (laid end to end in order: 74 blocks, 95.5%)."""
    import random

    rng = random.Random(0)
    lengths = [rng.randint(8, 120) for _ in range(1000)]
    blocks = data.best_fit_decreasing(lengths, 512)
    assert sorted(i for b in blocks for i in b) == list(range(1000))
    assert all(sum(lengths[i] for i in b) <= 512 for b in blocks)
    assert len(blocks) <= -(-sum(lengths) // 512) + 1  # at most one block over the minimum
    assert data.best_fit_decreasing([512, 1, 511], 512) == [[0], [2, 1]]

    from helpers import config, loading

    tok = loading.load_tokenizer("embedded")
    c = dataclasses.replace(config.make_config(), packing=True, max_length=512,
                            dataset="embedded", eval_fraction=0.0)
    rows = data.prepare(c, tok).train["input_ids"]
    tokens = sum(map(len, rows))
    assert len(rows) <= -(-tokens // 512) + 1 and tokens / (len(rows) * 512) > 0.98


def test_collator_pads_labels_with_ignore_index_and_keeps_eos(tmp_path):
    tok = _train_tokenizer(pad=EOS)  # the original recipe's pad = EOS: the worst case
    assert tok.pad_token_id == tok.eos_token_id
    path = _jsonl(tmp_path / "q.jsonl", QUOTES)
    for packing in (False, True):
        prepared = data.prepare(_cfg(tmp_path, path, MAX_LENGTH=48, EVAL_FRACTION=0,
                                     PACKING=packing), tok)
        rows = [prepared.train[i] for i in range(len(prepared.train))]
        batch = data.CompletionCollator(tok, pad_to_multiple_of=8)(rows)
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0 and width >= max(len(r["input_ids"]) for r in rows)
        eos = tok.eos_token_id
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            assert (batch["labels"][i, n:] == -100).all() and (batch["input_ids"][i, n:] == eos).all()
            assert batch["labels"][i, :n].tolist() == r["labels"]
            assert batch["labels"][i, n - 1] == eos  # the last real token: EOS, counted
            if packing:
                inner = [k for k in range(n - 1) if r["input_ids"][k] == eos]
                assert all(batch["labels"][i, k] == eos for k in inner)
                assert batch["position_ids"][i, :n].tolist() == r["position_ids"]
            else:
                mask = batch["attention_mask"][i]
                assert mask[:n].all() and not mask[n:].any()
        if packing:
            assert "attention_mask" not in batch and batch["use_cache"] is False
            assert any(len([p for p in r["position_ids"] if p == 0]) > 1 for r in rows)


def test_packed_examples_do_not_attend_to_each_other(tmp_path, tokenizer):
    """With the collator's packed batch, a tiny GPT-NeoX gives each example the logits it gets
    alone (transformers builds a causal mask per example from the restarting position_ids)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64)).eval()
    path = _jsonl(tmp_path / "q.jsonl", QUOTES)
    prepared = data.prepare(_cfg(tmp_path, path, MAX_LENGTH=64, EVAL_FRACTION=0, PACKING=True),
                            tokenizer)
    rows = [prepared.train[i] for i in range(len(prepared.train))]
    batch = data.CompletionCollator(tokenizer)(rows)
    with torch.no_grad():
        logits = model(**batch).logits
        row = rows[0]
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert len(starts) > 2
        for a, b in itertools.pairwise(starts):
            alone = model(torch.tensor([row["input_ids"][a:b]])).logits[0]
            assert torch.allclose(logits[0, a:b], alone, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad input


def test_missing_column_names_the_available_ones(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "q.jsonl", QUOTES)
    with pytest.raises(formats.DatasetError) as err:
        data.prepare(_cfg(tmp_path, path, DATA_FORMAT="text", TEXT_COLUMN="body"), tokenizer)
    assert "'body'" in str(err.value) and "quote, author, tags" in str(err.value)
    assert "TEXT_COLUMN" in str(err.value)
    with pytest.raises(formats.DatasetError, match="instruction / input"):
        data.prepare(_cfg(tmp_path, path, DATA_FORMAT="instruction"), tokenizer)


def test_template_placeholder_must_be_a_column(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "q.jsonl", QUOTES)
    with pytest.raises(formats.DatasetError) as err:
        data.prepare(_cfg(tmp_path, path, TEMPLATE="{quote} by {writer}"), tokenizer)
    assert "'writer'" in str(err.value) and "quote, author, tags" in str(err.value)
    # a template that names no column at all is a parameter error, refused before any data
    with pytest.raises(ConfigError, match="names no column"):
        data.prepare(_cfg(tmp_path, path, TEMPLATE="no placeholders"), tokenizer)


def test_empty_dataset(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(formats.DatasetError, match="empty"):
        data.prepare(_cfg(tmp_path, empty), tokenizer)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(formats.DatasetError, match="no rows"):
        data.prepare(_cfg(tmp_path, blank, DATA_FORMAT="text", TEXT_COLUMN="text"), tokenizer)


def test_missing_file_and_unsupported_extension(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="embedded"):
        formats.load_source(_cfg(tmp_path, tmp_path / "nowhere.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        formats.load_source(_cfg(tmp_path, "quotes.xlsx"))  # a file name, not a Hub id
    odd = tmp_path / "quotes.xlsx"
    odd.write_text("x")
    with pytest.raises(formats.DatasetError) as err:
        formats.load_source(_cfg(tmp_path, odd))
    for ext in (".jsonl", ".json", ".csv", ".parquet", ".txt"):
        assert ext in str(err.value)


def test_rows_with_missing_fields_are_named(tmp_path, tokenizer):
    rows = [dict(q) for q in QUOTES] * 2
    for i in (2, 5, 7, 11, 13, 17):
        rows[i] = {**rows[i], "author": None}
    path = _jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(formats.DatasetError) as err:
        data.prepare(_cfg(tmp_path, path), tokenizer)
    msg = str(err.value)  # 1-based, as the file's lines
    assert "6 row(s)" in msg and "'author'" in msg and "lines 3, 6, 8, 12, 14, ... of q.jsonl" in msg
    assert "filter" in msg
    blank = tmp_path / "gaps.jsonl"  # blank lines are skipped by the loader, not by the count
    blank.write_text("".join(json.dumps(r) + "\n\n" for r in rows[:3]))
    with pytest.raises(formats.DatasetError, match=r"line 5 of gaps\.jsonl;"):
        data.prepare(_cfg(tmp_path, blank), tokenizer)
    table = tmp_path / "q.csv"  # other files: rows, the header not counted
    table.write_text("quote,author\nA,B\nC,\nE,F\n")
    with pytest.raises(formats.DatasetError, match=r"row 2 of q\.csv;"):
        data.prepare(_cfg(tmp_path, table), tokenizer)


def test_an_unreadable_json_line_is_named_with_the_parsers_message(tmp_path, tokenizer):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"quote": "a", "author": "b"}\n\n{"quote": "c", "author": "d",}\n')
    with pytest.raises(formats.DatasetError) as err:
        formats.load_source(_cfg(tmp_path, broken))
    msg = str(err.value)
    assert "broken.jsonl: line 3, column" in msg  # 1-based, blank lines counted
    assert "Expecting property name enclosed in double quotes" in msg  # the json module's words
    assert "one JSON object" in msg and "DatasetGenerationError" not in msg
    listed = tmp_path / "list.jsonl"
    listed.write_text('{"quote": "a", "author": "b"}\n["c", "d"]\n')
    with pytest.raises(formats.DatasetError, match=r"list\.jsonl: line 2 is a JSON list, not an"):
        formats.load_source(_cfg(tmp_path, listed))
    array = tmp_path / "array.json"
    array.write_text('[\n {"quote": "a"},\n {"quote": "b" "author": 1}\n]\n')
    with pytest.raises(formats.DatasetError, match=r"array\.json: line 3, column \d+: Expecting"):
        formats.load_source(_cfg(tmp_path, array))
    table = tmp_path / "broken.csv"  # other parsers: their own message, not the wrapper's
    table.write_text("quote,author\na,b\nc,d,e\n")
    with pytest.raises(formats.DatasetError, match=r"broken\.csv .*Expected 2 fields in line 3"):
        formats.load_source(_cfg(tmp_path, table))


def test_unknown_chat_role_names_the_allowed_ones(tmp_path, tokenizer):
    bad = CHATS + [{"messages": [{"role": "human", "content": "hi"},
                                 {"role": "gpt", "content": "hello"}]}]
    path = _jsonl(tmp_path / "chat.jsonl", bad)
    with pytest.raises(formats.DatasetError) as err:
        data.prepare(_cfg(tmp_path, path, DATA_FORMAT="chat"), tokenizer)
    msg = str(err.value)
    assert "system, user, assistant" in msg
    assert "line 3 (message 1: 'human') of chat.jsonl" in msg  # 1-based line and message
    odd = _jsonl(tmp_path / "odd.jsonl", CHATS + [{"messages": "hello"}])
    with pytest.raises(formats.DatasetError, match=r"line 3 of odd\.jsonl"):
        data.prepare(_cfg(tmp_path, odd, DATA_FORMAT="chat"), tokenizer)


def test_held_out_examples_are_the_rows_training_holds_out(tmp_path, tokenizer):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(40)]
    cfg = _cfg(tmp_path, _jsonl(tmp_path / "i.jsonl", rows), DATA_FORMAT="instruction")
    train_rows, eval_rows, own = data.split_rows(cfg)
    assert not own and len(eval_rows) == 4
    pairs = data.held_out_examples(cfg, tokenizer, n=3)
    assert [r for _, r in pairs] == eval_rows["output"][:3]
    assert pairs[0][0] == formats.instruction_prompt(eval_rows[0]["instruction"])
    assert pairs[0][0].endswith("### Response:\n")  # the newline training put there
    assert not set(eval_rows["output"]) & set(train_rows["output"])
    chat = _cfg(tmp_path, _jsonl(tmp_path / "c.jsonl", CHATS * 5), DATA_FORMAT="chat",
                EVAL_FRACTION=0.5)
    for prompt, reference in data.held_out_examples(chat, tokenizer, n=5):
        assert reference in ("Hello!", "Money, some say.")  # the last assistant turn
        assert prompt.endswith("<|im_start|>assistant\n")
        assert reference not in prompt
    quotes = _cfg(tmp_path, _jsonl(tmp_path / "q.jsonl", QUOTES), EVAL_FRACTION=0.3)
    for prompt, reference in data.held_out_examples(quotes, tokenizer):
        whole = prompt + reference
        assert any(whole == f"{q['quote']} ({q['author']})" for q in QUOTES)
        assert len(prompt.split()) in (1, 2) and reference


def test_local_paths_are_shown_by_name(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "mine.jsonl", QUOTES)
    assert formats.public_name(path) == "mine.jsonl"
    assert formats.public_name(tmp_path) == tmp_path.name
    assert formats.public_name("owner/name") == "owner/name"
    assert formats.public_name("embedded") == "embedded"
    prepared = data.prepare(_cfg(tmp_path, path), tokenizer)
    text = json.dumps(prepared.stats)
    assert str(tmp_path) not in text and "mine.jsonl" in text


# ---------------------------------------------------------------------------------------------
# save, reuse, rebuild; figures; display


def test_saved_dataset_is_reused_and_rebuilt_when_settings_change(tmp_path, tokenizer, capsys):
    path = _jsonl(tmp_path / "q.jsonl", QUOTES)
    cfg = _cfg(tmp_path, path, MAX_LENGTH=32)
    first = data.load_or_prepare(cfg, tokenizer)
    assert first.origin == "prepared"
    assert (tmp_path / "run" / "dataset").is_dir()
    stats = json.loads((tmp_path / "run" / "dataset_stats.json").read_text())
    assert stats["fingerprint"] == first.stats["fingerprint"] == data.fingerprint(cfg, tokenizer)

    again = data.load_or_prepare(cfg, tokenizer)
    assert again.origin == "reused" and again.metrics() == first.metrics()
    assert again.train[0] == first.train[0] and len(again.eval) == len(first.eval)

    changed = data.load_or_prepare(_cfg(tmp_path, path, MAX_LENGTH=48), tokenizer)
    assert changed.origin.startswith("rebuilt") and "max_length: 32 -> 48" in changed.origin
    assert "max_length: 32 -> 48" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "dataset_stats.json").read_text())["settings"][
        "max_length"] == 48
    other = _train_tokenizer(chat_template=None)
    other.add_tokens(["<|extra|>"])
    assert data.load_or_prepare(_cfg(tmp_path, path, MAX_LENGTH=48), other).origin.startswith(
        "rebuilt")


def test_metrics_figures(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "q.jsonl", QUOTES)
    prepared = data.prepare(_cfg(tmp_path, path), tokenizer)
    m = prepared.metrics()
    for key in ("train_examples", "eval_examples", "train_tokens", "train_loss_tokens",
                "truncated_examples", "mean_tokens", "p95_tokens", "max_tokens"):
        assert isinstance(m[key], (int, float)), key
    assert m["train_examples"] == 9 and m["eval_examples"] == 1
    assert len(prepared.lengths) == 9
    import numpy as np

    lengths = np.asarray(prepared.lengths)
    assert m["mean_tokens"] == pytest.approx(lengths.mean(), abs=0.005)
    assert m["median_tokens"] == np.median(lengths)
    assert m["p95_tokens"] == pytest.approx(np.percentile(lengths, 95), abs=0.005)
    assert (m["max_tokens"], m["min_tokens"]) == (lengths.max(), lengths.min())
    assert "train examples" in repr(prepared)


def test_render_examples_and_histogram(tmp_path, tokenizer):
    from helpers import plots

    path = _jsonl(tmp_path / "ins.jsonl", INSTRUCTIONS)
    prepared = data.prepare(_cfg(tmp_path, path, DATA_FORMAT="instruction", EVAL_FRACTION=0),
                            tokenizer)
    view = data.render_examples(prepared, tokenizer, n=2)
    text = str(view)
    assert text.count("--- example") == 2
    assert f"[{EOS}]" in text  # EOS shown, and it counts
    assert "### Instruction:↵" in text and "[" not in text.split("### Response:")[0].split("\n", 1)[1]
    assert "background:#b7ebb4" in view._repr_html_() and "&lt;|endoftext|&gt;" in view.html
    fig = plots.length_histogram(prepared.lengths + [200], max_length=64)
    assert "1 over MAX_LENGTH" in fig.axes[0].get_title()
