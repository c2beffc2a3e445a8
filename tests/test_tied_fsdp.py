"""Tied embeddings under FSDP2 (two real torchrun processes, CPU, gloo): the one matrix is
sharded once and its gradient collects both uses, as in one process on the whole batch."""

from __future__ import annotations

from train_helpers import torchrun_script

SCRIPT = '''
import torch
import torch.distributed as dist

from tune_models import Decoder, qwen2_tiny
from tune_train.distributed import shard_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = qwen2_tiny(vocab_size=64)  # tied embeddings and q/k/v biases
reference = Decoder(config)
reference.init_weights()
with torch.no_grad():
    for name, p in reference.named_parameters():
        if name.endswith(".bias"):
            p.uniform_(-0.5, 0.5)  # zero biases would hide a missing gradient
model = Decoder(config)
model.load_state_dict(reference.state_dict())
tokens, labels = torch.randint(0, 64, (2, 2 * world, 24))

shard_model(model)
assert "output.weight" not in model.state_dict()
rows = slice(2 * rank, 2 * rank + 2)
model(tokens[rows], labels=labels[rows]).backward()
reference(tokens, labels=labels).backward()
expected = dict(reference.named_parameters())
assert {name for name, _ in model.named_parameters()} == set(expected)
for name, p in model.named_parameters():
    # FSDP averages the ranks' gradients; the reference summed the whole batch.
    torch.testing.assert_close(p.grad.full_tensor() * world, expected[name].grad,
                               atol=1e-5, rtol=1e-4, msg=name)
assert model.output.weight is model.tok_embeddings.weight
dist.destroy_process_group()
if rank == 0:
    print("tied gradients agree")
'''


def test_tied_embeddings_shard_once_and_get_both_gradients(tmp_path):
    assert "tied gradients agree" in torchrun_script(tmp_path, SCRIPT, 2)
