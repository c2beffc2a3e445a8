"""tune_train.errors: every package's user errors are recognised by type, in one place."""

import subprocess
import sys

import pytest

from tune_ckpt import CheckpointError
from tune_data import DataError
from tune_train.config import ConfigError
from tune_train.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    EvalError,
    PlotError,
    RecipeError,
    explain,
)


@pytest.mark.parametrize("error_type", [ConfigError, RecipeError, EvalError, PlotError,
                                        CheckpointError, DataError])
def test_user_errors_are_their_own_message(error_type):
    assert explain(error_type("batch_size must be >= 1")) == ("batch_size must be >= 1",
                                                              EXIT_USER_ERROR)


def test_a_look_alike_name_is_not_enough():
    # The CLI used to match class names, so anyone's "ConfigError" passed as a user error
    # (and the names "GenerationError" and "EvalError" matched nothing that existed).
    class ConfigError(Exception):
        pass

    message, status = explain(ConfigError("boom"))
    assert message == ("ConfigError: boom (an unexpected error; rerun with --debug for the "
                       "traceback and report it)")
    assert status == EXIT_USER_ERROR


def test_files_interrupts_and_bugs():
    missing = FileNotFoundError(2, "No such file or directory", "/no/such.yaml")
    assert explain(missing) == ("No such file or directory: /no/such.yaml", EXIT_USER_ERROR)
    assert explain(KeyboardInterrupt()) == ("interrupted", EXIT_INTERRUPTED)
    message, _ = explain(ZeroDivisionError("division by zero\nsecond line"))
    assert message.startswith("ZeroDivisionError: division by zero (an unexpected error;")


def test_the_error_module_imports_no_torch():
    code = ("import sys, tune_train.errors as e; e.explain(ValueError('x'));"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
