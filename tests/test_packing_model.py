"""Packed batches give the model exactly the per-sample losses (tune-data x tune-models)."""

import pytest
import torch

from tune_data import SentencePieceTokenizer, alpaca_dataset, chat_dataset, collate, pack
from tune_models import Decoder, llama2_tiny


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A model this small runs ~10x faster on one thread than on two busy shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["alpaca", "chat"])
def setup(request, llama2_tokenizer_path, tmp_path_factory):
    tokenizer = SentencePieceTokenizer(llama2_tokenizer_path)
    cache_dir = tmp_path_factory.mktemp("cache")
    if request.param == "alpaca":
        data = alpaca_dataset(
            tokenizer, data_files=request.getfixturevalue("alpaca_json_path"),
            split="train[:24]", max_seq_len=256, cache_dir=cache_dir,
        )
    else:  # conversations of 2 to 6 turns: several trained spans per sample
        data = chat_dataset(
            tokenizer, data_files=request.getfixturevalue("sharegpt_json_path"),
            split="train[:24]", max_seq_len=256, chat_template="llama2", cache_dir=cache_dir,
        )
        assert data.turns.counts.max() == 6
    torch.manual_seed(0)
    model = Decoder(llama2_tiny(vocab_size=tokenizer.vocab_size))
    # Larger weights than a real init: peaked attention makes any leak across documents show.
    model.init_weights(std=0.2)
    model.eval()
    return tokenizer, data, model


def _sample_loss(model, sample):
    return model(sample["tokens"][None], labels=sample["labels"][None])


@torch.no_grad()
def test_packed_loss_equals_the_sum_of_unpacked_losses(setup):
    tokenizer, data, model = setup
    packed = pack(data, max_seq_len=256)
    assert len(packed) < len(data)  # several samples share a row
    per_sample = torch.stack([_sample_loss(model, data[i]) for i in range(len(data))])

    batch = collate([packed[r] for r in range(len(packed))], pad_id=tokenizer.pad_id)
    assert batch["tokens"].shape == (len(packed), 256)
    total = model(batch["tokens"], input_pos=batch["input_pos"], mask=batch["mask"],
                  labels=batch["labels"])
    torch.testing.assert_close(total, per_sample.sum(), rtol=1e-5, atol=0)
    for r in range(len(packed)):  # and row by row
        row = {k: v[r : r + 1] for k, v in batch.items()}
        loss = model(row["tokens"], input_pos=row["input_pos"], mask=row["mask"],
                     labels=row["labels"])
        torch.testing.assert_close(loss, per_sample[packed.bins[r]].sum(), rtol=1e-5, atol=0)

    # Without the mask, documents see each other and the loss changes (the test can fail).
    leaky = model(batch["tokens"], labels=batch["labels"])
    assert abs(leaky - total) > 1e-3 * total


@torch.no_grad()
def test_padded_batch_loss_equals_the_sum_of_unpadded_losses(setup):
    tokenizer, data, model = setup
    samples = [data[i] for i in range(8)]
    batch = collate(samples, pad_id=tokenizer.pad_id)
    assert len({len(s["tokens"]) for s in samples}) > 1  # really padded
    expected = sum(_sample_loss(model, s) for s in samples)
    torch.testing.assert_close(model(batch["tokens"], labels=batch["labels"]), expected,
                               rtol=1e-5, atol=0)
