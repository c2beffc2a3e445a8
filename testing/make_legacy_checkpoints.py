"""Write tests/fixtures/legacy_5cb8ced: training runs made by tune at commit 5cb8ced.

It was run once, at that commit, before tune-train was reorganised (issue 20), and its output
is committed, so that every later version is tested against checkpoints an earlier tune
really wrote (tests/test_legacy_checkpoints.py): they must still resume and load. (Its calls
follow today's API; running it now makes checkpoints of today's tune.)

    uv run python testing/make_legacy_checkpoints.py

What it writes (paths inside are relative: the test copies the folder and rewrites them):

* ``tokenizer.model``, ``data.jsonl``: the demo's tokenizer and 400 demo records.
* ``start/``: a seeded llama2_tiny base (vocabulary 64).
* ``full/``: a full fine-tuning run of 6 steps from ``start`` (validation and save_best on)
  as a kill after its step-3 checkpoint leaves it: that checkpoint (whose trainer state
  records the best validation loss so far), config.yaml and the metrics of steps 1-3;
  ``full.jsonl`` the metrics of the same run left to finish (steps 1-6).
* ``lora/`` and ``lora.jsonl``: the same for a LoRA run (rank 4 on q, v, gate, dropout 0).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_helpers import make_demo_files, run_recipe, save_tiny_base, tiny_config  # noqa: E402

OUT = HERE.parent / "tests" / "fixtures" / "legacy_5cb8ced"


def _settings(files: dict[str, Path], start: Path, output_dir: Path, **extra) -> dict:
    return tiny_config(files, output_dir=str(output_dir), model_checkpoint=str(start),
                       model_args={"vocab_size": 64}, max_steps_per_epoch=6,
                       save_every_n_steps=3, keep_last_n_checkpoints=5,
                       validation_split=0.05, eval_every_n_steps=3, save_best=True,
                       lr_scheduler="cosine", warmup_steps=1, **extra)


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    work = OUT.parent / ".legacy-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    files = make_demo_files(work, records=400)
    start, _ = save_tiny_base(work)
    OUT.mkdir(parents=True)
    shutil.copy(files["tokenizer"], OUT / "tokenizer.model")
    shutil.copy(files["data"], OUT / "data.jsonl")
    shutil.copytree(start.parent, OUT / "start")
    lora = dict(lora_rank=4, lora_alpha=8.0, lora_target_modules=["q", "v", "gate"])
    for name, extra, recipe in (("full", {}, "full_finetune"), ("lora", lora, "lora_finetune")):
        run = work / name
        run_recipe(_settings(files, start, run, **extra), recipe)
        (OUT / f"{name}.jsonl").write_text((run / "metrics.jsonl").read_text())
        # Keep the run as a kill after step 3 would have left it: its step-3 checkpoint, the
        # best model so far and the first three steps of metrics.
        keep = OUT / name
        keep.mkdir()
        shutil.copytree(run / "checkpoints" / "step_0000003",
                        keep / "checkpoints" / "step_0000003")
        best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
        if best["step"] <= 3:
            shutil.copytree(run / "checkpoints" / "best", keep / "checkpoints" / "best")
        lines = (run / "metrics.jsonl").read_text().splitlines()
        early = [line for line in lines if json.loads(line)["step"] <= 3]
        (keep / "metrics.jsonl").write_text("\n".join(early) + "\n")
        # The run's config, with its paths relative to the fixture folder.
        text = (run / "config.yaml").read_text().replace(f"{work}/", "")
        (keep / "config.yaml").write_text(text)
    shutil.rmtree(work)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
