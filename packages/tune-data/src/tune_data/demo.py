"""The offline demo's data: instruction tasks the project generates, and a SentencePiece
tokenizer trained on them at first use.

Nothing is downloaded and nothing comes from outside the repository: the records are made
from a seeded random generator, so every machine gets the same files.

Tasks (each answer is a pure function of the input, so correctness is checkable):

* ``Reverse: knfd``   -> ``dfnk``   (3 to 5 random letters)
* ``Sort: knfd``      -> ``dfkn``
* ``Add: 7+8``        -> ``15``     (single digits)

A 0.75M-parameter model (the ``demo`` config) learns all three in three epochs of 20,000
records (1,836 steps with the config's 2% held out, about a minute on 2 CPU cores): on
held-out strings it reverses and sorts about 99% correctly. One epoch is not enough:
reversing is then only half-learnt, and how far it got depends on the seed and on the CPU's
floating-point rounding.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from tune_data.templates import DEMO as DEMO_TEMPLATE

TASKS = ("Reverse", "Sort", "Add")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
DEFAULT_RECORDS = 20_000


def solve(instruction: str, text: str) -> str:
    """The correct answer to a demo prompt."""
    if instruction == "Reverse":
        return text[::-1]
    if instruction == "Sort":
        return "".join(sorted(text))
    if instruction == "Add":
        a, b = text.split("+")
        return str(int(a) + int(b))
    raise ValueError(f"unknown demo task '{instruction}'")


def demo_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n records {instruction, input, output}, cycling through the tasks."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        if task == "Add":
            text = f"{rng.randint(0, 9)}+{rng.randint(0, 9)}"
        else:
            text = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))
        records.append({"instruction": task, "input": text, "output": solve(task, text)})
    return records


def render(record: dict[str, str]) -> str:
    return DEMO_TEMPLATE.render(record)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_demo_data(path: str | Path, n: int = DEFAULT_RECORDS, seed: int = 0) -> Path:
    """Write the demo records as JSON lines (if not there yet); returns the path."""
    path = Path(path)
    if not path.is_file():
        lines = "".join(json.dumps(r) + "\n" for r in demo_records(n, seed))
        _atomic_write_text(path, lines)
    return path


def train_demo_tokenizer(path: str | Path, vocab_size: int = 64) -> Path:
    """Train a small SentencePiece model on generated demo text (if not there yet).

    Character-level pieces: the tasks are about letters and digits, and a merged piece such
    as ``ab`` would make reversing a string a lookup the tiny model cannot learn quickly. Ids
    follow Llama 2's layout (unk 0, bos 1, eos 2) so everything downstream is unchanged.
    """
    import io

    import sentencepiece as spm

    path = Path(path)
    if path.is_file():
        return path
    text = [render(r) + r["output"] for r in demo_records(3000, seed=1)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, model_type="char",
        vocab_size=vocab_size, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    return path


def demo_tokenizer(path: str | Path):
    """The demo's tokenizer at ``path``, trained there first if it is missing."""
    from tune_data.tokenizers import SentencePieceTokenizer

    return SentencePieceTokenizer(train_demo_tokenizer(path))


def demo_dataset(
    tokenizer: Any,
    source: str | None = None,
    data_files: Any = None,
    split: str = "train",
    train_on_input: bool = False,
    max_seq_len: int | None = 64,
    *,
    num_records: int = DEFAULT_RECORDS,
    **kwargs: Any,
):
    """The generated demo tasks as a tokenised instruction dataset.

    The records are written to ``source`` (a .jsonl path; default ``tune-demo/data.jsonl``)
    on first use and loaded from there like any local dataset.
    """
    from tune_data.instruct import instruct_dataset

    path = write_demo_data(source or data_files or "tune-demo/data.jsonl", num_records)
    return instruct_dataset(
        tokenizer, str(path), DEMO_TEMPLATE, split=split, train_on_input=train_on_input,
        max_seq_len=max_seq_len, **kwargs,
    )
