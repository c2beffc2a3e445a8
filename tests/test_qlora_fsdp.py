"""QLoRA under FSDP2 (two real torchrun processes, CPU, gloo): the NF4 base is sharded like any
frozen parameter, never re-rounded by mixed precision, and the adapters' gradients are those
of one process on the whole batch."""

from __future__ import annotations

import pytest

from train_helpers import torchrun_script

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
    assert "qlora gradients agree" in torchrun_script(tmp_path, SCRIPT, 2)


BUILD_SCRIPT = '''
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from tune_ckpt.building import build_model, checkpoint_weights
from tune_models import DecoderConfig, LoRASettings
from tune_train.distributed import shard_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
base, mode = Path(sys.argv[1]), sys.argv[2]
config = DecoderConfig(**json.loads(sys.argv[3]))
settings = None if mode == "full" else LoRASettings(4, 8.0, 0.0, ("q", "v", "o", "gate", "up",
                                                                 "down", "output"))


def build(shard):
    return build_model(config, checkpoint_weights(base, config), lora=settings,
                       quantize="nf4" if mode == "nf4" else None, device="cpu",
                       dtype=torch.float32, seed=3, shard=shard)


def peak_bytes(prof):
    """Peak of torch's running total of CPU tensor bytes over the profiled region."""
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events
               if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)


with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    sharded = build(shard_model)
peak = peak_bytes(prof)
whole = build(None)  # what one process builds
theirs = dict(whole.named_parameters())
assert [n for n, _ in sharded.named_parameters()] == list(theirs)
for name, p in sharded.named_parameters():
    assert p.requires_grad == theirs[name].requires_grad, name
    assert torch.equal(p.full_tensor(), theirs[name].detach()), name
# The bf16 checkpoint becomes fp32 weights: one process allocates the whole base; each of
# these keeps a third of it, plus one weight in flight.
base_bytes = sum(p.numel() * p.element_size() for p in whole.parameters()
                 if not p.requires_grad or settings is None)
if mode != "nf4":
    assert 0.2 * base_bytes < peak < 0.6 * base_bytes, (peak, base_bytes)
dist.destroy_process_group()
if rank == 0:
    print(f"built in shards: peak {peak} bytes of a {base_bytes}-byte base")
'''


@pytest.mark.parametrize("mode", ["none", "nf4", "full"])
def test_each_process_builds_only_its_shards_of_the_model_one_process_builds(tmp_path, mode):
    """tune --nproc_per_node N lora_finetune.py (and full_finetune.py, which builds with the
    same builder): no process holds the whole base, and the shards make up exactly the model
    (base, NF4 base, adapters) one process builds. Three processes, so some tensors split
    unevenly."""
    import json

    import torch

    from tune_ckpt import save_native
    from tune_models import Decoder, DecoderConfig

    config = DecoderConfig(vocab_size=64, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                           hidden_dim=352, max_seq_len=64)
    torch.manual_seed(0)
    model = Decoder(config)
    model.init_weights()
    base = tmp_path / "base" / "native_pytorch_model.pt"
    base.parent.mkdir()
    save_native({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, base,
                model_args=config)
    args = {f: getattr(config, f) for f in ("vocab_size", "dim", "n_layers", "n_heads",
                                            "n_kv_heads", "hidden_dim", "max_seq_len")}
    out = torchrun_script(tmp_path, BUILD_SCRIPT, 3, str(base), mode, json.dumps(args))
    assert "built in shards" in out
