"""tune-data: tokenizers, prompt templates, datasets, masking, packing, sampling.

``datasets`` is imported only when a dataset is built, so tokenizer-only users (generation)
start fast.

    >>> from tune_data import load_tokenizer, alpaca_dataset, pack, collate, ShardedBatchSampler
    >>> tok = load_tokenizer("tokenizer.model")  # SentencePiece, Llama 3 tiktoken or tokenizer.json
    >>> ds = alpaca_dataset(tok, data_files="alpaca_5000.json", max_seq_len=512)
    >>> print(describe(ds))
    >>> chats = chat_dataset(tok, data_files="sharegpt.json", chat_template="llama2")
"""

from collections.abc import Callable

from tune_data.chat import chat_dataset, chat_prompt, normalize_messages
from tune_data.chat_templates import (
    CHAT_TEMPLATES,
    ChatTemplate,
    JinjaChatTemplate,
    default_chat_template,
    load_chat_template,
)
from tune_data.collate import collate, document_mask
from tune_data.dataset import IGNORE_INDEX, TokenizedDataset, shifted_labels
from tune_data.demo import DEMO_TEMPLATE, demo_dataset, demo_tokenizer
from tune_data.errors import DataError
from tune_data.instruct import alpaca_cleaned_dataset, alpaca_dataset, instruct_dataset
from tune_data.packing import PackedDataset, pack, plan_rows
from tune_data.report import DataStats, check_trainable, describe, render_sample
from tune_data.sampler import ShardedBatchSampler
from tune_data.synthetic import random_tokens_dataset
from tune_data.templates import (
    ALPACA,
    NO_INPUT_PLACEHOLDERS,
    TEMPLATES,
    PromptTemplate,
    as_template,
    is_empty_input,
)
from tune_data.text import text_completion_dataset
from tune_data.tokenizers import (
    TOKENIZER_KINDS,
    HFTokenizer,
    Llama2Tokenizer,
    Llama3Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerKind,
    kind_of,
    load_tokenizer,
)

# Dataset builders by the name configs use; each takes the tokenizer first, then keywords.
DATASETS: dict[str, Callable[..., TokenizedDataset]] = {
    "alpaca": alpaca_dataset,
    "alpaca_cleaned": alpaca_cleaned_dataset,
    "instruct": instruct_dataset,
    "text_completion": text_completion_dataset,
    "chat": chat_dataset,
    "demo": demo_dataset,
    "random_tokens": random_tokens_dataset,
}

__all__ = [
    "ALPACA", "CHAT_TEMPLATES", "ChatTemplate", "JinjaChatTemplate", "chat_dataset",
    "chat_prompt", "default_chat_template", "load_chat_template", "normalize_messages",
    "DATASETS", "DEMO_TEMPLATE", "IGNORE_INDEX", "NO_INPUT_PLACEHOLDERS", "DataError",
    "DataStats", "HFTokenizer", "Llama2Tokenizer", "Llama3Tokenizer", "PackedDataset",
    "PromptTemplate", "SentencePieceTokenizer", "ShardedBatchSampler", "TEMPLATES",
    "TOKENIZER_KINDS", "TokenizedDataset", "Tokenizer", "TokenizerKind", "kind_of",
    "alpaca_cleaned_dataset", "alpaca_dataset", "as_template",
    "check_trainable", "collate", "demo_dataset", "demo_tokenizer", "describe", "document_mask",
    "instruct_dataset", "is_empty_input", "load_tokenizer", "pack", "plan_rows",
    "random_tokens_dataset", "render_sample", "shifted_labels", "text_completion_dataset",
]
