"""Text completion: documents cut into max_seq_len chunks, every token a target."""

import json

import numpy as np
import pytest

from tune_data import IGNORE_INDEX, DataError, describe, text_completion_dataset
from tune_data import text as text_module


def test_tinyshakespeare_in_chunks(tokenizer, tinyshakespeare_path, datasets_cache):
    ds = text_completion_dataset(
        tokenizer, data_files=tinyshakespeare_path, max_seq_len=512, cache_dir=datasets_cache
    )
    total = 368_633 + 2  # the data README's count, plus BOS and EOS
    assert len(ds) == -(-total // 512) == 720
    assert (ds.lengths[:-1] == 512).all() and ds.lengths.sum() == total
    whole = tokenizer.encode(tinyshakespeare_path.read_text(), add_bos=True, add_eos=True)
    joined = np.concatenate([ds[i]["tokens"].numpy() for i in range(len(ds))])
    assert np.array_equal(joined, whole)  # cut at newlines and encoded in parallel: same ids
    sample = ds[3]
    assert sample["labels"][:-1].tolist() == sample["tokens"][1:].tolist()
    assert sample["labels"][-1] == IGNORE_INDEX
    assert ds[0]["tokens"][0] == tokenizer.bos_id and ds[1]["tokens"][0] != tokenizer.bos_id


def test_documents_from_jsonl_and_empty_ones_dropped(tmp_path, tokenizer):
    docs = [{"text": "A short document."}, {"text": ""}, {"text": "word " * 100}, {"text": " "}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ds = text_completion_dataset(tokenizer, data_files=path, max_seq_len=32,
                                 cache_dir=tmp_path / "c")
    assert ds.rows.tolist()[0] == 0 and set(ds.rows.tolist()) == {0, 2}
    assert ds.lengths.max() == 32
    stats = describe(ds)
    assert stats.dropped == 2 and stats.dropped_rows == [1, 3]
    with pytest.raises(DataError, match="no 'content' column .*column='your_text_column'"):
        text_completion_dataset(tokenizer, data_files=path, column="content",
                                cache_dir=tmp_path / "c")


def test_a_long_document_in_blocks_has_the_whole_texts_ids(any_tokenizer, tinyshakespeare_path,
                                                           tmp_path):
    # A book is cut into ~64k-character blocks (after a newline followed by text) so the
    # tokenizer gets a batch; joined, the blocks' ids are the whole book's.
    text = tinyshakespeare_path.read_text()
    assert len(text_module._blocks_at_newlines(text, text_module._BLOCK_CHARS)) > 10
    ds = text_completion_dataset(any_tokenizer, data_files=tinyshakespeare_path,
                                 max_seq_len=None, cache_dir=tmp_path)
    assert len(ds) == 1
    whole = any_tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ds[0]["tokens"].tolist() == whole
