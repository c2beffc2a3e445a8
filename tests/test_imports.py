"""Import boundaries from ARCHITECTURE.md, asserted on sys.modules in fresh interpreters."""

import json
import subprocess
import sys

import pytest

FORBIDDEN = {
    "tune_models": ["datasets", "click", "huggingface_hub", "tune_train", "tune_data", "tune_ckpt"],
    # tune-ckpt may use tune-models (torch only), where a model's shape is defined once.
    "tune_ckpt": ["datasets", "click", "tune_train", "tune_data"],
    "tune_ckpt.conversion": ["datasets", "click", "tune_train", "tune_data", "transformers"],
    "tune_data": ["tune_models", "tune_ckpt", "tune_train", "click"],
    "tune_cli.main": ["torch", "datasets", "tune_train"],  # `tune --help` must stay instant
}


@pytest.mark.parametrize("module", list(FORBIDDEN))
def test_import_does_not_load_forbidden_modules(module):
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    bad = loaded & set(FORBIDDEN[module])
    assert not bad, f"import {module} loaded {sorted(bad)}"
