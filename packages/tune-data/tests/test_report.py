"""What a user sees before training: describe() and render_sample()."""

import json

import numpy as np
import pytest

from tune_data import (
    ALPACA,
    DataError,
    TokenizedDataset,
    alpaca_dataset,
    chat_dataset,
    check_trainable,
    describe,
    pack,
    render_sample,
)
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


def _chats(tokenizer, tmp_path, **kwargs):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {i} {'please ' * (i % 3)}"},
        {"role": "assistant", "content": f"{i}"}]}) + "\n" for i in range(6)))
    return data, chat_dataset(tokenizer, data_files=str(data), cache_dir=tmp_path / "c",
                              **kwargs)


def test_a_dataset_with_nothing_to_train_is_refused_with_the_reason(tokenizer, tmp_path):
    """Training on it would run at loss 0 (no samples: fail at the first batch) and exit 0."""
    data, ok = _chats(tokenizer, tmp_path, chat_template="llama2")
    check_trainable(ok)
    cases = [
        (dict(chat_template="{{ '' }}"),
         f"{data}: none of its 6 samples has a trained token, so a run would learn nothing "
         "(loss 0): its chat template renders nothing for every conversation; check the "
         "template"),
        (dict(chat_template="{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}"
                            "{% endif %}{% endfor %}"),
         f"{data}: none of its 6 samples has a trained token, so a run would learn nothing "
         "(loss 0): its chat template renders no assistant answer in any conversation (or the "
         "conversations have no assistant messages); check the template and the roles"),
        (dict(chat_template="llama2", max_seq_len=8),
         f"{data}: all 6 records were dropped: a record is dropped when none of its trained "
         "tokens fit in max_seq_len 8 (a long prompt, or long turns before the first answer) "
         "or when it is empty; raise max_seq_len or check the data"),
    ]
    for kwargs, message in cases:
        _, dataset = _chats(tokenizer, tmp_path, **kwargs)
        with pytest.raises(DataError) as error:
            check_trainable(dataset)
        assert str(error.value) == message


def test_render_sample_of_an_empty_dataset_says_why_it_is_empty(tokenizer, tmp_path):
    data, dropped = _chats(tokenizer, tmp_path, chat_template="llama2", max_seq_len=8)
    with pytest.raises(DataError, match=f"{data}: all 6 records were dropped: "):
        render_sample(dropped, 0)  # was an IndexError
    assert "no samples: all 6 records were dropped" in str(describe(dropped))
    _, ok = _chats(tokenizer, tmp_path, chat_template="llama2")
    with pytest.raises(DataError, match=f"there is no sample 6: {data} holds 6 \\(0 to 5\\)"):
        render_sample(ok, 6)
    assert render_sample(ok, -1).startswith("sample -1: ")
