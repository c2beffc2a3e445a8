"""A stand-in for Gemma 3's ``tokenizer.model``, which no snapshot here holds (4.7 MB, over
every limit): a SentencePiece BPE trained on real text with the settings and special pieces
of Gemma's file, so that everything tune does with a Gemma tokenizer runs on a real
SentencePiece model of that shape.

What it shares with the published file (checked against transformers' GemmaConverter, which
reads the same settings): BPE with byte fallback, no dummy "▁" prefix, whitespace kept as it
is (identity normalisation, no folding of runs), digits split, pad 0 / eos 1 / bos 2 /
unk 3 named ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``, and ``<start_of_turn>`` /
``<end_of_turn>`` as user-defined pieces. What it does not: the 262,144-piece vocabulary
(this one has ``vocab_size`` pieces) and the ids of the turn markers (105 and 106 there).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

# Gemma 3's special pieces at their published ids.
GEMMA_SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
GEMMA_USER_DEFINED = ("<mask>", "<start_of_turn>", "<end_of_turn>")


def train_gemma_tokenizer(folder: Path, texts: Iterable[str], vocab_size: int = 3000) -> Path:
    """Train the stand-in on ``texts`` and write it as ``folder/tokenizer.model``.

    Returns:
        The file's path.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=list(GEMMA_USER_DEFINED), byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.9995,
        max_sentence_length=1 << 20, num_threads=1, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def training_texts(sharegpt_json: Path, alpaca_json: Path) -> list[str]:
    """Real text to train it on: every ShareGPT message and 2,000 Alpaca records."""
    conversations = json.loads(sharegpt_json.read_text())
    texts = [m["value"] for r in conversations for m in r["conversations"]]
    records = json.loads(alpaca_json.read_text())[:2000]
    return texts + [r["instruction"] + "\n" + r["output"] for r in records]
