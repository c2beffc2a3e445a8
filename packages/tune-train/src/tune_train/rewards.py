"""Reward functions for reinforcement learning with verifiable rewards (the grpo recipe).

A reward function scores completions: ``fn(completions, prompts=..., answers=..., **columns)
-> one number per completion``, where ``answers`` (and any other column of the prompt
records) are the records' own. A config lists them with weights; the reward a completion
gets is the weighted sum::

    rewards:
      - {name: math_answer, weight: 1.0}
      - {name: format, weight: 0.2, args: {pattern: "<answer>.*</answer>"}}
      - {name: my_rewards.py:brevity, weight: 0.1}

Built in (:data:`BUILTIN_REWARDS`): ``math_answer`` (1 when the completion's final number
equals the answer's: GSM8K's ``#### N``, ``\\boxed{N}``, else the last number; commas, signs,
``$`` and a trailing ``.0`` handled), ``exact_match`` (the stripped completion equals the
answer), ``format`` (1 when a regular expression matches), ``length`` (0 up to a target
length, then minus the excess as a fraction of the target).

A name of the form ``path/to/file.py:function`` is the user's own code, loaded from that
file and run as it is, with the user's permissions: tune imports it only because the config
(the user's own command) names it, never from a checkpoint, a downloaded model folder or a
run's output_dir (such a path is refused).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from tune_train.config import ConfigError
from tune_train.errors import RecipeError

RewardFunction = Callable[..., Sequence[float]]

__all__ = ["BUILTIN_REWARDS", "Reward", "RewardFunction", "extract_answer", "load_rewards",
           "score"]

# A number as people write it: optional sign, thousands commas, decimals.
_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?|[-+]?\$?\.\d+")
_GSM8K_FINAL = re.compile(r"####\s*([^\n]*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _number(text: str) -> Fraction | None:
    """The number a string spells ("1,234", "-5", "$3.50", "7.0"), exactly, or None."""
    found = _NUMBER.search(text)
    if found is None:
        return None
    digits = found.group(0).replace(",", "").replace("$", "")
    try:
        return Fraction(digits)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> Fraction | None:
    """The final numeric answer of a solution: after GSM8K's ``####``, else the last
    ``\\boxed{}``, else the last number in the text; None if there is none."""
    final = _GSM8K_FINAL.findall(text)
    if final:
        return _number(final[-1])
    boxed = _BOXED.findall(text)
    if boxed:
        return _number(boxed[-1])
    numbers = _NUMBER.findall(text)
    return _number(numbers[-1]) if numbers else None


def math_answer() -> RewardFunction:
    """1.0 where the completion's final number equals the answer's, else 0.0."""

    def reward(completions: Sequence[str], *, answers: Sequence[Any], **_: Any) -> list[float]:
        out = []
        for completion, answer in zip(completions, answers):
            want = extract_answer(str(answer)) if answer is not None else None
            got = extract_answer(completion)
            out.append(1.0 if want is not None and got == want else 0.0)
        return out

    return reward


def exact_match(case_sensitive: bool = True) -> RewardFunction:
    """1.0 where the completion, stripped, is the answer, stripped."""

    def reward(completions: Sequence[str], *, answers: Sequence[Any], **_: Any) -> list[float]:
        def norm(text: str) -> str:
            return text.strip() if case_sensitive else text.strip().lower()

        return [1.0 if answer is not None and norm(c) == norm(str(answer)) else 0.0
                for c, answer in zip(completions, answers)]

    return reward


def format_reward(pattern: str, full: bool = False) -> RewardFunction:
    """1.0 where ``pattern`` (a Python regular expression, dot matching newlines) is found
    in the completion (``full``: matches the whole completion), else 0.0."""
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"reward 'format': pattern {pattern!r} is not a regular expression "
                          f"({e})") from e

    def reward(completions: Sequence[str], **_: Any) -> list[float]:
        match = regex.fullmatch if full else regex.search
        return [1.0 if match(c) else 0.0 for c in completions]

    return reward


def length_penalty(target: int) -> RewardFunction:
    """0.0 up to ``target`` characters, then minus the excess as a fraction of the target
    (a completion twice the target scores -1.0)."""
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise ConfigError(f"reward 'length': target must be a positive whole number of "
                          f"characters, got {target!r}")

    def reward(completions: Sequence[str], **_: Any) -> list[float]:
        return [-max(0, len(c) - target) / target for c in completions]

    return reward


BUILTIN_REWARDS: dict[str, Callable[..., RewardFunction]] = {
    "math_answer": math_answer,
    "exact_match": exact_match,
    "format": format_reward,
    "length": length_penalty,
}


@dataclass(frozen=True)
class Reward:
    """One reward of a config: its name (for messages and metrics), weight and function."""

    name: str
    weight: float
    function: RewardFunction = field(repr=False)


def load_rewards(specs: Sequence[Mapping[str, Any]], *,
                 forbidden: Sequence[str | Path] = ()) -> list[Reward]:
    """The rewards a config lists.

    Args:
        specs: ``{name, weight (default 1), args (default {})}`` each; a name is a built-in
            reward or ``path/to/file.py:function``.
        forbidden: Folders a user's reward file must not lie in (the run's output_dir, the
            model's and tokenizer's folders: checkpoints and downloads are not code to run).

    Raises:
        ConfigError: An unknown name (with the nearest), a file that does not exist or is not
            Python, a function it does not define or that is not callable, a bad weight or
            arguments.
    """
    if not specs:
        raise ConfigError("rewards is empty; list at least one, e.g. rewards: [{name: "
                          "math_answer}]")
    rewards = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(f"rewards[{i}] is {spec!r}; each reward is {{name: ..., weight: "
                              "..., args: {...}}")
        unknown = sorted(set(spec) - {"name", "weight", "args"})
        if unknown:
            raise ConfigError(f"rewards[{i}] has unknown key '{unknown[0]}'; a reward takes "
                              "name, weight and args")
        name, weight, args = spec["name"], spec.get("weight", 1.0), spec.get("args") or {}
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight)):
            raise ConfigError(f"rewards[{i}] ('{name}'): weight must be a finite number, got "
                              f"{weight!r}")
        if not isinstance(args, Mapping):
            raise ConfigError(f"rewards[{i}] ('{name}'): args must be a mapping, got {args!r}")
        if isinstance(name, str) and ":" in name and name.split(":")[0].endswith(".py"):
            function = _user_function(name, forbidden)
            if args:
                raise ConfigError(f"rewards[{i}] ('{name}'): args are for built-in rewards; a "
                                  "function of your own reads what it needs itself")
        else:
            function = _builtin(str(name), dict(args), i)
        rewards.append(Reward(str(name), float(weight), function))
    return rewards


def _builtin(name: str, args: dict[str, Any], index: int) -> RewardFunction:
    import difflib
    import inspect

    if name not in BUILTIN_REWARDS:
        close = difflib.get_close_matches(name, list(BUILTIN_REWARDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"rewards[{index}]: unknown reward '{name}'{hint}; built in: "
                          f"{', '.join(BUILTIN_REWARDS)}, or path/to/file.py:function")
    factory = BUILTIN_REWARDS[name]
    accepted = inspect.signature(factory).parameters
    extra = sorted(set(args) - set(accepted))
    if extra:
        takes = ", ".join(accepted) or "none"
        raise ConfigError(f"rewards[{index}] ('{name}') takes no argument '{extra[0]}'; its "
                          f"arguments: {takes}")
    missing = [p for p, v in accepted.items() if v.default is inspect.Parameter.empty
               and p not in args]
    if missing:
        raise ConfigError(f"rewards[{index}] ('{name}') needs args.{missing[0]}")
    return factory(**args)


def _user_function(spec: str, forbidden: Sequence[str | Path]) -> RewardFunction:
    file, _, function = spec.rpartition(":")
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"reward '{spec}': {path} does not exist; name a Python file of "
                          "yours and a function in it (path/to/file.py:function)")
    resolved = path.resolve()
    for folder in forbidden:
        folder = Path(folder).expanduser().resolve()
        if resolved.is_relative_to(folder):
            raise ConfigError(f"reward '{spec}': {path} lies in {folder}, a model, download or "
                              "run folder; tune runs reward code only from a file of yours "
                              "outside those: copy it elsewhere and name that copy")
    module_spec = importlib.util.spec_from_file_location(f"tune_reward_{path.stem}", resolved)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward '{spec}': {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # the user's own code, run as it is
    except Exception as e:  # noqa: BLE001 - reported as what it is, the user's code failing
        raise ConfigError(f"reward '{spec}': importing {path} raised {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    found = getattr(module, function, None)
    if found is None:
        raise ConfigError(f"reward '{spec}': {path} defines no '{function}'")
    if not callable(found):
        raise ConfigError(f"reward '{spec}': '{function}' in {path} is not a function")
    return found


def score(rewards: Sequence[Reward], completions: Sequence[str], *,
          prompts: Sequence[str], answers: Sequence[Any],
          columns: Mapping[str, Sequence[Any]] | None = None
          ) -> tuple[list[float], dict[str, list[float]]]:
    """Score completions with every reward.

    Args:
        rewards: The config's rewards (:func:`load_rewards`).
        completions: The completions' texts.
        prompts: Each completion's prompt text.
        answers: Each completion's record's answer (None where it has none).
        columns: Other columns of the records, one value per completion.

    Returns:
        (the weighted sum per completion, each reward's own scores by name).

    Raises:
        RecipeError: A reward raised, returned another number of scores, or a score that is
            not a finite number: one line naming the reward and the completion.
    """
    n = len(completions)
    total = [0.0] * n
    each: dict[str, list[float]] = {}
    for reward in rewards:
        try:
            values = reward.function(list(completions), prompts=list(prompts),
                                     answers=list(answers), **dict(columns or {}))
        except Exception as e:  # noqa: BLE001 - one line naming the reward, not a traceback
            raise RecipeError(f"reward '{reward.name}' raised {type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]} (scoring {n} "
                              "completions)") from e
        try:
            values = list(values)
        except TypeError:
            raise RecipeError(f"reward '{reward.name}' returned {type(values).__name__}, not "
                              f"one number per completion ({n})") from None
        if len(values) != n:
            raise RecipeError(f"reward '{reward.name}' returned {len(values)} scores for {n} "
                              "completions; return one number per completion")
        scores = []
        for i, value in enumerate(values):
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise RecipeError(f"reward '{reward.name}' gave completion {i} {value!r}, not a "
                                  "finite number")
            scores.append(float(value))
            total[i] += reward.weight * float(value)
        each[reward.name] = scores
    return total, each
