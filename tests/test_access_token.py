"""The access token is never shown: `tune download` and `tune-ckpt download`, real processes
against the local hub stand-in, with tokens as they arrive from files and environments."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
COMMANDS = {"tune": [str(BIN / "tune")], "tune-ckpt": [str(BIN / "tune-ckpt")]}


def _download(command: str, repo, out: Path, *extra: str, env: dict | None = None,
              debug: bool = False) -> subprocess.CompletedProcess:
    args = [*COMMANDS[command], *(["--debug"] if debug else []), "download", repo.repo_id,
            "--output-dir", str(out), "--quiet" if command == "tune-ckpt" else None, *extra]
    return subprocess.run([a for a in args if a is not None], capture_output=True, text=True,
                          env=env or repo.server.env(), timeout=300)


def _shown(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def _assert_hidden(token: str, text: str) -> None:
    # Not the token, nor any piece of it between the characters that make it invalid.
    for piece in [token, *re.split(r"[\x00-\x20\x7f]+", token)]:
        if len(piece) >= 6:
            assert piece not in text, f"{piece!r} was shown"


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("ending", ["\r\n", "\r", "\n", " \t"])
def test_a_token_with_a_line_ending_downloads(tiny_meta_repo, tmp_path, command, ending):
    # `--hf-token "$(cat token.txt)"` of a file saved on Windows keeps the "\r": the HTTP
    # layer refused the header and its error printed the token.
    token = tiny_meta_repo.token + ending
    result = _download(command, tiny_meta_repo, tmp_path / "out", "--hf-token", token)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "params.json").is_file()
    _assert_hidden(tiny_meta_repo.token, _shown(result))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("inner, kind, position", [("\r", "a control character", 13),
                                                   ("\n", "a control character", 13),
                                                   ("\x1b", "a control character", 13),
                                                   ("é", "a non-ASCII character", 13)])
def test_a_token_with_an_inner_bad_character_is_refused_without_showing_it(
        tiny_meta_repo, tmp_path, command, inner, kind, position):
    token = tiny_meta_repo.token[:12] + inner + tiny_meta_repo.token[12:]
    result = _download(command, tiny_meta_repo, tmp_path / "out", "--hf-token", token)
    assert result.returncode == 1
    prefix = "tune-ckpt: error: " if command == "tune-ckpt" else "error: "
    assert _error_lines(result) == [
        f"{prefix}the --hf-token value holds {kind} at position {position}, which no access "
        "token has: copy the token again (https://huggingface.co/settings/tokens)"]
    _assert_hidden(token, _shown(result))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_hf_token_variable_is_named_not_shown(tiny_meta_repo, tmp_path, command):
    token = tiny_meta_repo.token[:12] + "\x1b" + tiny_meta_repo.token[12:]
    env = {**tiny_meta_repo.server.env(), "HF_TOKEN": token}
    result = _download(command, tiny_meta_repo, tmp_path / "out", env=env)
    assert result.returncode == 1
    [line] = _error_lines(result)
    assert line.endswith("error: HF_TOKEN holds a control character at position 13, which no "
                         "access token has: copy the token again "
                         "(https://huggingface.co/settings/tokens)")
    _assert_hidden(token, _shown(result))
    # The variable's token with a line ending works (the hub client strips it too).
    env["HF_TOKEN"] = tiny_meta_repo.token + "\r\n"
    ok = _download(command, tiny_meta_repo, tmp_path / "out", env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    _assert_hidden(tiny_meta_repo.token, _shown(ok))


@pytest.mark.parametrize("command", COMMANDS)
def test_an_http_layer_error_quoting_the_token_is_shown_without_it(tiny_meta_repo, tmp_path,
                                                                   command):
    # The token the hub client reads by itself (`hf auth login`'s file), damaged: the HTTP
    # layer refuses to send the header and its exception quotes the header, token included.
    token = tiny_meta_repo.token + "\x00"
    (tiny_meta_repo.server.home / "token").write_text(token)
    result = _download(command, tiny_meta_repo, tmp_path / "out")
    assert result.returncode == 1
    [line] = _error_lines(result)
    assert line.endswith("error: the token saved by `hf auth login` holds a control character "
                         "at position 28, which no access token has: run `hf auth login` "
                         "again, or pass a token with --hf-token")
    _assert_hidden(tiny_meta_repo.token, _shown(result))
    # --debug shows the whole traceback, the HTTP layer's exception among it, with the
    # header's credential replaced.
    debug = _download(command, tiny_meta_repo, tmp_path / "out", debug=True)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "Bearer ***" in debug.stderr
    _assert_hidden(tiny_meta_repo.token, _shown(debug))
