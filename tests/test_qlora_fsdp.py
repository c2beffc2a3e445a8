"""QLoRA under FSDP2 (two real torchrun processes, CPU, gloo): the NF4 base is sharded like any
frozen parameter, never re-rounded by mixed precision, and the adapters' gradients are those
of one process on the whole batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = '''
import copy

import torch
import torch.distributed as dist

from tune_models import Decoder, apply_lora, llama2_tiny, quantize_base
from tune_train.distributed import shard_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = llama2_tiny(vocab_size=64)
reference = Decoder(config)
reference.init_weights()
apply_lora(reference, rank=4, alpha=8, targets=["q", "v", "o", "gate", "up", "down", "output"])
quantize_base(reference, "nf4")
with torch.no_grad():
    for name, p in reference.named_parameters():
        if ".lora_b" in name:
            p.normal_(0, 0.1)  # zero B would hide a missing gradient of A
model = copy.deepcopy(reference)
bf16 = copy.deepcopy(reference)
tokens, labels = torch.randint(0, 64, (2, 2 * world, 24))

shard_model(model)
codes = model.layers[0].feed_forward.w1.weight_nf4
assert codes.dtype == torch.uint8 and codes.to_local().numel() < codes.full_tensor().numel()
rows = slice(2 * rank, 2 * rank + 2)
loss = model(tokens[rows], labels=labels[rows])
loss.backward()
reference(tokens, labels=labels).backward()
expected = dict(reference.named_parameters())
trained = {name for name, p in model.named_parameters() if p.requires_grad}
assert trained == {name for name in expected if ".lora_" in name}, sorted(trained)[:3]
for name, p in model.named_parameters():
    if p.requires_grad:
        # FSDP averages the ranks' gradients; the reference summed the whole batch.
        torch.testing.assert_close(p.grad.full_tensor() * world, expected[name].grad,
                                   atol=1e-5, rtol=1e-4, msg=name)
    else:
        assert p.grad is None, name

# bf16 compute: FSDP casts floating parameters to bf16 for the all-gather; the NF4 tensors
# are integers, so they arrive as they are and dequantise to the same weights.
shard_model(bf16, param_dtype=torch.bfloat16)
low = bf16(tokens[rows], labels=labels[rows])
torch.testing.assert_close(low.float(), loss.detach(), rtol=2e-2, atol=0)
dist.destroy_process_group()
if rank == 0:
    print("qlora gradients agree")
'''


def test_qlora_shards_the_nf4_base_and_trains_the_adapters_as_one_process(tmp_path):
    script = tmp_path / "qlora_fsdp.py"
    script.write_text(SCRIPT)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run(
        [torchrun, "--nnodes", "1", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qlora gradients agree" in proc.stdout
