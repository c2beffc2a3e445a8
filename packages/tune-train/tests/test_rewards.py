"""Reward functions: the built-in ones score what they say, on real GSM8K answers too, and a
user's own function is loaded from the file the config names and nowhere else; a reward
that fails is one line naming it and the completion."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from tune_train.config import ConfigError
from tune_train.errors import RecipeError
from tune_train.rewards import extract_answer, load_rewards, score


def _scores(specs, completions, answers):
    total, each = score(load_rewards(specs), completions, prompts=[""] * len(completions),
                        answers=answers)
    return total, each


@pytest.mark.parametrize("text, value", [
    ("so the total is 72.\n#### 72", 72),
    ("#### 1,234", 1234),
    ("#### -5", -5),
    ("The answer is $3.50", Fraction(7, 2)),
    ("7.0 apples", 7),
    ("we get \\boxed{12} and then 99 is unrelated", 12),
    ("first 3, then 4, finally 18", 18),
    ("+8", 8),
    ("no number here", None),
])
def test_the_final_answer_is_read_as_people_write_it(text, value):
    assert extract_answer(text) == value


def test_math_answer_scores_real_gsm8k_answers(gsm8k_test_path):
    """Every GSM8K reference answer has a readable final number; a completion that ends with
    it (spelled another way) scores 1, one off by one scores 0."""
    records = [json.loads(line) for line in gsm8k_test_path.read_text().splitlines()]
    answers = [r["answer"] for r in records]
    finals = [extract_answer(a) for a in answers]
    assert all(f is not None for f in finals)
    assert any("," in a.split("####")[-1] for a in answers)  # thousands commas are in there
    right = [f"Working it out... the answer is {f.numerator / f.denominator:,}" for f in finals]
    wrong = [f"the answer is {f + 1}" for f in finals]
    total, _ = _scores([{"name": "math_answer"}], right + wrong, answers + answers)
    assert total == [1.0] * len(records) + [0.0] * len(records)


def test_weights_add_the_rewards_up():
    specs = [{"name": "exact_match", "weight": 2.0},
             {"name": "format", "weight": 0.5, "args": {"pattern": r"^\d+$", "full": True}},
             {"name": "length", "weight": 1.0, "args": {"target": 4}}]
    total, each = _scores(specs, ["42", "42 is it", "12345678"], ["42", "42", "9"])
    assert each == {"exact_match": [1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0],
                    "length": [0.0, -1.0, -1.0]}
    assert total == [2.5, -1.0, -0.5]


def test_a_users_reward_function_is_loaded_from_the_named_file(tmp_path):
    file = tmp_path / "my_rewards.py"
    file.write_text("def brevity(completions, *, prompts, answers, **columns):\n"
                    "    return [1.0 / (1 + len(c)) for c in completions]\n")
    total, each = _scores([{"name": f"{file}:brevity"}], ["", "abc"], [None, None])
    assert total == [1.0, 0.25]


@pytest.mark.parametrize("body, message", [
    ("def f(completions, **kw):\n    raise ValueError('boom')\n",
     "reward '{spec}' raised ValueError: boom (scoring 2 completions)"),
    ("def f(completions, **kw):\n    return [1.0, 'high']\n",
     "reward '{spec}' gave completion 1 'high', not a finite number"),
    ("def f(completions, **kw):\n    return [1.0, float('nan')]\n",
     "reward '{spec}' gave completion 1 nan, not a finite number"),
    ("def f(completions, **kw):\n    return [1.0]\n",
     "reward '{spec}' returned 1 scores for 2 completions; return one number per completion"),
])
def test_a_reward_that_fails_is_one_line_naming_it(tmp_path, body, message):
    file = tmp_path / "r.py"
    file.write_text(body)
    spec = f"{file}:f"
    with pytest.raises(RecipeError) as e:
        _scores([{"name": spec}], ["a", "b"], [None, None])
    assert str(e.value) == message.format(spec=spec)


def test_reward_names_that_cannot_work_are_one_line(tmp_path):
    file = tmp_path / "r.py"
    file.write_text("value = 3\n")
    cases = [
        ([{"name": "math_anwser"}], "unknown reward 'math_anwser' (did you mean 'math_answer'?)"),
        ([{"name": f"{tmp_path}/nope.py:f"}], "nope.py does not exist"),
        ([{"name": f"{file}:g"}], "defines no 'g'"),
        ([{"name": f"{file}:value"}], "'value' in"),
        ([{"name": "format"}], "rewards[0] ('format') needs args.pattern"),
        ([{"name": "format", "args": {"pattern": "("}}], "is not a regular expression"),
        ([{"name": "length", "args": {"target": 0}}], "target must be a positive whole number"),
        ([{"name": "exact_match", "weight": float("inf")}], "weight must be a finite number"),
        ([{"name": "exact_match", "wieght": 1}], "unknown key 'wieght'"),
        ([], "rewards is empty"),
    ]
    for specs, message in cases:
        with pytest.raises(ConfigError, match=None) as e:
            load_rewards(specs)
        assert message in str(e.value), (specs, str(e.value))
        assert "\n" not in str(e.value)


def test_reward_code_in_a_model_or_run_folder_is_refused(tmp_path):
    """A downloaded model folder or a run's output_dir may hold a .py file: tune never runs
    reward code from there, even when a config names it."""
    model = tmp_path / "downloaded-model"
    model.mkdir()
    (model / "reward.py").write_text("import os\nos.system('touch pwned')\n"
                                     "def f(c, **k):\n    return [0.0] * len(c)\n")
    with pytest.raises(ConfigError, match="lies in .*downloaded-model, a model, download or run "
                                          "folder"):
        load_rewards([{"name": f"{model}/reward.py:f"}], forbidden=[model])
    assert not Path("pwned").exists()
