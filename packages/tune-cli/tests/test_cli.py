"""The `tune` command as a user meets it: quick start-up, one-line errors, files it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TUNE = str(Path(sys.executable).with_name("tune"))


def tune(*args: str, cwd: Path | None = None, env: dict | None = None,
         ) -> subprocess.CompletedProcess:
    return subprocess.run([TUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env)


def _loaded_after(argv: list[str]) -> set[str]:
    """Top-level modules imported by running `tune <argv>` in a fresh interpreter."""
    code = (
        "import sys, json\n"
        "from tune_cli.main import main\n"
        f"sys.argv = ['tune', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return set(json.loads(out.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["config", "ls"], ["recipe", "ls"],
                                  ["config", "show", "--keys"], ["run", "--help"]])
def test_quick_commands_never_import_torch(argv):
    loaded = _loaded_after(argv)
    assert not loaded & {"torch", "datasets", "numpy", "sentencepiece"}, sorted(loaded)


def test_config_ls_and_cp(tmp_path):
    listed = tune("config", "ls")
    assert listed.returncode == 0
    assert "alpaca_llama2_full_finetune" in listed.stdout and "demo" in listed.stdout
    copied = tune("config", "cp", "alpaca_llama2_full_finetune",
                  "custom_alpaca_llama2_full_finetune", cwd=tmp_path)
    assert copied.returncode == 0
    written = tmp_path / "custom_alpaca_llama2_full_finetune.yaml"
    assert yaml.safe_load(written.read_text())["model"] == "llama2_7b"
    # Never overwrite what the user has, unless asked.
    written.write_text("batch_size: 99\n")
    again = tune("config", "cp", "alpaca_llama2_full_finetune",
                 "custom_alpaca_llama2_full_finetune", cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip() == (f"Error: {written.name} already exists; pass --force to "
                                    "overwrite it")
    assert written.read_text() == "batch_size: 99\n"
    forced = tune("config", "cp", "alpaca_llama2_full_finetune",
                  "custom_alpaca_llama2_full_finetune", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and "llama2_7b" in written.read_text()


def test_config_show_applies_overrides_and_lists_keys():
    shown = tune("config", "show", "alpaca_llama2_full_finetune", "batch_size=8", "lr=1e-4")
    cfg = yaml.safe_load(shown.stdout)
    assert cfg["batch_size"] == 8 and cfg["lr"] == 1e-4 and cfg["optimizer"] == "SGD"
    keys = tune("config", "show", "--keys").stdout
    assert "resume_from_checkpoint" in keys and "wandb.project" in keys


def test_config_validate_names_every_problem(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"model": "llama2_8b", "tokenizer_checkpoint":
                                    str(tmp_path / "no.model")}))
    result = tune("config", "validate", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: 'model' is 'llama2_8b' (did you mean 'llama2_7b'?)")
    assert "no.model does not exist" in lines[1]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, code, message", [
    (["config", "show", "nope"], 1, "error: config 'nope' is neither a file nor a built-in"),
    (["config", "show", "demo", "bach_size=3"], 1,
     "error: unknown key 'bach_size' (did you mean 'batch_size'?)"),
    (["run", "full_finetune", "--config", "demo", "dtype=fp8"], 1,
     "'dtype' is 'fp8', which is not one of"),
    (["frobnicate"], 2, "No such command 'frobnicate'"),
    (["run", "no_such_recipe"], 2, "recipe 'no_such_recipe' is neither a file nor a built-in"),
    (["plot", "/nonexistent"], 1, "error: no metrics at /nonexistent; train with"),
])
def test_mistakes_are_one_line_without_traceback(args, code, message):
    result = tune(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 3


def test_debug_shows_the_traceback():
    result = tune("--debug", "config", "show", "nope")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize("name", ["full_finetune", "lora_finetune"])
def test_recipe_cp_then_run_the_copy_by_path(tmp_path, demo_files, name):
    copied = tune("recipe", "cp", name, str(tmp_path))
    assert copied.returncode == 0
    recipe = tmp_path / f"{name}.py"
    source = recipe.read_text()
    # The copy is the whole run: its loop is in the file, not inherited.
    assert "for micro_batches in data.steps(" in source and ".backward()" in source
    assert "import tune_train.recipes" not in source and "from tune_train.recipes" not in source
    # The user edits their copy; the edit must be what runs.
    line = 'run.print(f"epoch {epoch + 1} done: checkpoint {save()}")'
    assert line in source
    recipe.write_text(source.replace(
        line, 'save()\n            run.print(f"my edited recipe finished epoch {epoch + 1}")'))
    config = tmp_path / "c.yaml"
    extra = {"lora_rank": 4} if name == "lora_finetune" else {}
    config.write_text(yaml.safe_dump({**_tiny(demo_files, tmp_path / "out"), **extra}))
    result = tune("run", str(recipe), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "my edited recipe finished epoch 1" in result.stdout + result.stderr


def _tiny(demo_files, output_dir: Path) -> dict:
    from train_helpers import tiny_config

    return tiny_config(demo_files, output_dir=str(output_dir), max_steps_per_epoch=3)


def test_generate_and_plot_after_a_run(tmp_path, demo_files):
    config = tmp_path / "c.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump({**_tiny(demo_files, out), "plot": False}))
    assert tune("run", "full_finetune", "--config", str(config)).returncode == 0
    generated = tune("generate", "--checkpoint", str(out), "--template", "demo", "-p",
                     "Sort: cab", "-p", "Add: 1+2", "--max-new-tokens", "4")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.count("### ") == 2
    assert "tokens/s" in generated.stderr
    text = tmp_path / "notes.txt"
    text.write_text("Sort: abc\nabc\nAdd: 1+1\n2\n" * 20)
    evaluated = tune("eval", "--checkpoint", str(out), "--perplexity", str(text))
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.startswith("perplexity ")
    ppl = float(evaluated.stdout.split()[1])
    assert 1.0 < ppl < 64.0  # better than uniform over the 64-piece vocabulary
    plotted = tune("plot", str(out), "-o", str(tmp_path / "curve.png"))
    assert plotted.returncode == 0
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n')
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from tune_cli.main import main\n"
            f"sys.argv = ['tune', 'plot', {str(tmp_path)!r}]\nmain()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: plotting needs matplotlib: pip install " \
                                    "'tune-train[plot]'"


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    from train_helpers import make_demo_files

    return make_demo_files(tmp_path_factory.mktemp("demo"), records=300)


def test_data_show_and_stats(tmp_path, demo_files):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_tiny(demo_files, tmp_path / "out")))
    shown = tune("data", "show", str(config), "--index", "0", "--index", "3")
    assert shown.returncode == 0, shown.stderr
    first = json.loads(demo_files["data"].read_text().splitlines()[0])
    assert first["input"] in shown.stdout and first["output"] in shown.stdout
    stats = tune("data", "stats", str(config))
    assert stats.returncode == 0, stats.stderr
    assert "300" in stats.stdout  # every generated record became a sample


def test_shell_completion_offers_commands():
    import os

    env = {**os.environ, "COMP_WORDS": "tune con", "COMP_CWORD": "1",
           "_TUNE_COMPLETE": "bash_complete"}
    result = tune(env=env)
    assert "plain,config" in result.stdout and "plain,convert_checkpoint" in result.stdout
