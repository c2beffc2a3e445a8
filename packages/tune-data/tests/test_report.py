"""What a user sees before training: describe() and render_sample()."""

import json

import numpy as np

from tune_data import ALPACA, TokenizedDataset, alpaca_dataset, describe, pack, render_sample
from tune_data.dataset import prefix_mask


def test_describe_real_alpaca(alpaca):
    stats = describe(alpaca, batch_sizes=(8,))
    assert (stats.source_rows, stats.samples, stats.dropped, stats.truncated) == (5000, 5000, 0, 3)
    assert stats.no_loss == 0 and stats.loss_tokens < stats.tokens == int(alpaca.lengths.sum())
    assert stats.length_max == 512
    assert stats.truncated_rows == alpaca.rows[alpaca.truncated].tolist()
    assert 0.2 < stats.padding[8] < 0.7  # random batching of Alpaca wastes a lot on padding
    text = str(stats)
    assert "5,000 samples from 5,000 records" in text and "3 sample(s) truncated to 512" in text

    packed = describe(pack(alpaca, 512))
    assert packed.packed_rows < 5000 / 3 and packed.packed_fill > 0.97
    assert "rows," in str(packed) and "full" in str(packed)


def test_describe_counts_samples_without_loss(tokenizer):
    tokens = np.array(tokenizer.encode("one two three four five six"), dtype=np.int32)
    n = len(tokens)
    offsets = np.array([0, n, 2 * n])
    ds = TokenizedDataset(
        np.concatenate([tokens, tokens]), offsets, prefix_mask(offsets, np.array([n, 2])),
        np.array([4, 9]), np.zeros(2, bool), tokenizer=tokenizer, name="hand", source_rows=10,
    )
    stats = describe(ds)
    assert (stats.no_loss, stats.no_loss_rows, stats.dropped) == (1, [4], 8)
    assert "1 sample(s) have no loss tokens" in str(stats) and "rows 4" in str(stats)


def test_render_marks_the_masked_prompt(alpaca, alpaca_records, tokenizer):
    row = int(alpaca.rows[1])
    text = render_sample(alpaca, 1)
    record = alpaca_records[row]
    header, body = text.split("\n", 1)
    assert header.startswith("sample 1: ") and "with loss" in header
    masked, trained = body.split("⟧")
    assert masked.startswith("⟦<s>Below is an instruction")
    assert masked.endswith("### Response:\n")
    assert trained == record["output"] + "</s>"

    colored = render_sample(alpaca, 1, color=True)
    assert "\x1b[2m<s>Below" in colored and "⟦" not in colored

    table = render_sample(alpaca, 1, show_ids=True)
    assert "'▁Below'" in table and "pos" in table


def test_render_a_packed_row_shows_each_document(alpaca):
    packed = pack(alpaca, 512)
    text = render_sample(packed, 0)
    assert text.count("── document ──") == len(packed.bins[0]) - 1
    assert text.count("⟦<s>Below is an instruction") == len(packed.bins[0])
    last = render_sample(packed, len(packed) - 1)
    padding = 512 - int(alpaca.lengths[packed.bins[-1]].sum())
    assert padding > 0 and last.endswith(f"── {padding} padding tokens ──")


def test_render_shows_every_familys_special_tokens_by_name(any_tokenizer, alpaca_records,
                                                           tmp_path):
    path = tmp_path / "few.json"
    path.write_text(json.dumps(alpaca_records[:5]))
    ds = alpaca_dataset(any_tokenizer, data_files=path, cache_dir=tmp_path / "c")
    names = {i: n for n, i in any_tokenizer.special_tokens.items()}
    bos = names.get(any_tokenizer.bos_id, "")  # Qwen2 has no BOS
    record = alpaca_records[int(ds.rows[1])]
    masked, trained = render_sample(ds, 1).split("\n", 1)[1].split("⟧")
    assert masked == "⟦" + bos + ALPACA.render(record)
    assert trained == record["output"] + names[any_tokenizer.eos_id]
