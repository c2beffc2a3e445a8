"""Downloads through the real huggingface_hub client against the local hub server."""

import signal
import subprocess
import sys
import time

import pytest

from tune_ckpt import CheckpointError, download

CLI = [sys.executable, "-m", "tune_ckpt.cli"]


def _cli(args, env, **kwargs):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120,
                          **kwargs)


def _error_lines(stderr):
    """The error lines (progress bars share stderr); there must be no traceback."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("tune-ckpt:")]


def _all_bytes_under(folder):
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_gated_repo_downloads_with_token_and_the_token_is_never_written(tiny_meta_repo, tmp_path):
    out = tmp_path / "llama2"
    result = _cli(["download", tiny_meta_repo.repo_id, "--output-dir", str(out),
                   "--hf-token", tiny_meta_repo.token], tiny_meta_repo.server.env())
    assert result.returncode == 0, result.stderr
    repo = tiny_meta_repo.server.repos[("model", tiny_meta_repo.repo_id)]
    for name, data in repo.files.items():
        assert (out / name).read_bytes() == data, name
    assert str(out) in result.stdout
    assert tiny_meta_repo.token not in result.stdout + result.stderr
    assert tiny_meta_repo.token.encode() not in _all_bytes_under(out)
    assert tiny_meta_repo.token.encode() not in _all_bytes_under(tiny_meta_repo.server.home)


def test_token_comes_from_hf_token_env_or_the_stored_login(tiny_meta_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", tiny_meta_repo.token)
    assert (download(tiny_meta_repo.repo_id, tmp_path / "a") / "params.json").is_file()
    monkeypatch.delenv("HF_TOKEN")
    (tiny_meta_repo.server.home / "token").write_text(tiny_meta_repo.token)  # `hf auth login`
    assert (download(tiny_meta_repo.repo_id, tmp_path / "b") / "params.json").is_file()


@pytest.mark.parametrize(
    "token, expected",
    [
        (None, "gated repository and needs an access token: request access on"),
        ("other", "has no access to the gated repository meta-llama/Llama-2-7b: request access"),
        ("hf_not_a_real_token", "rejected your access token (invalid or expired)"),
    ],
)
def test_gated_repo_refusals_say_what_to_do(tiny_meta_repo, tmp_path, token, expected):
    token = tiny_meta_repo.other_token if token == "other" else token
    with pytest.raises(CheckpointError, match=r".*") as e:
        download(tiny_meta_repo.repo_id, tmp_path / "out", token=token)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "out").glob("*.pth")), "nothing may be downloaded"


def test_cli_errors_are_one_line_with_exit_1_and_debug_shows_the_traceback(hub_server, tmp_path):
    args = ["download", "nobody/nothing", "--output-dir", str(tmp_path / "x")]
    result = _cli(args, hub_server.env())
    assert result.returncode == 1
    assert _error_lines(result.stderr) == [
        f"tune-ckpt: error: repository nobody/nothing not found on {hub_server.url}: check the "
        "id (owner/name); if it is private, pass a token with --hf-token (or set HF_TOKEN, or "
        "run `hf auth login`)"
    ]
    debug = _cli(["--debug", *args], hub_server.env())
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_revision_not_found(tiny_meta_repo, tmp_path):
    with pytest.raises(CheckpointError, match="revision 'v9' not found in meta-llama/Llama-2-7b"):
        download(tiny_meta_repo.repo_id, tmp_path, token=tiny_meta_repo.token, revision="v9")


def test_revision_by_commit_and_ignore_patterns(tiny_meta_repo, tmp_path):
    out = download(tiny_meta_repo.repo_id, tmp_path, token=tiny_meta_repo.token,
                   revision=tiny_meta_repo.sha, ignore_patterns=["*.pth", "LICENSE*"])
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == ["README.md", "params.json", "tokenizer.model"]


def test_hub_unreachable(tmp_path, monkeypatch, hub_server):
    import socket

    import huggingface_hub.constants as constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    with pytest.raises(CheckpointError, match=f"cannot reach the Hugging Face Hub at {dead}"):
        download("meta-llama/Llama-2-7b", tmp_path)


def test_disk_full_is_one_line_and_a_rerun_completes(tiny_meta_repo, tmp_path):
    out = tmp_path / "out"

    def small_disk():  # writes past 64 KiB fail, as on a full disk (EFBIG instead of ENOSPC)
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    args = ["download", tiny_meta_repo.repo_id, "--output-dir", str(out), "--hf-token",
            tiny_meta_repo.token]
    result = _cli(args, tiny_meta_repo.server.env(), preexec_fn=small_disk)
    assert result.returncode == 1
    [line] = _error_lines(result.stderr)
    assert line.startswith(f"tune-ckpt: error: could not write to {out}: File too large; free")
    assert not (out / "consolidated.00.pth").exists()
    assert _cli(args, tiny_meta_repo.server.env()).returncode == 0
    assert (out / "consolidated.00.pth").stat().st_size > 64 * 1024


def test_interrupted_download_completes_on_rerun_without_refetching_finished_files(
    tiny_meta_repo, tmp_path
):
    server, out = tiny_meta_repo.server, tmp_path / "out"
    big = "consolidated.00.pth"
    stall = server.stall(tiny_meta_repo.repo_id, big, after_bytes=1 << 20)
    args = ["download", tiny_meta_repo.repo_id, "--output-dir", str(out), "--hf-token",
            tiny_meta_repo.token, "--quiet"]
    proc = subprocess.Popen([*CLI, *args], env=server.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert stall.reached.wait(60), "the download never started"
        small = [f for f in tiny_meta_repo.files if f != big]
        done = out / ".cache" / "huggingface" / "download"
        deadline = time.monotonic() + 60
        while not all((done / f"{f}.metadata").is_file() for f in small):
            assert time.monotonic() < deadline, "the small files never finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # the user presses Ctrl-C in the middle of the big file
        proc.wait(30)  # promptly, not when the stalled transfer gives up
    finally:
        stall.release.set()
        proc.kill()
        proc.wait()
    assert proc.returncode == 130
    assert b"run the same command again" in proc.stderr.read()
    assert not (out / big).exists()
    assert not list(out.rglob("*.incomplete")), "a partial file was left behind"

    before = len(server.requests)
    result = _cli(args, server.env())
    assert result.returncode == 0, result.stderr
    fetched = [r.path.rsplit("/", 1)[1] for r in server.requests[before:]
               if r.method == "GET" and "/resolve/" in r.path]
    assert fetched == [big], "finished files were fetched again"
    data = server.repos[("model", tiny_meta_repo.repo_id)].files[big]
    assert (out / big).read_bytes() == data


def test_malformed_repo_id(hub_server, tmp_path):
    with pytest.raises(CheckpointError, match="'a/b/c' is not a valid repository id"):
        download("a/b/c", tmp_path)


def _downloaded(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and ".cache" not in p.parts)


def test_llama3_repo_comes_without_the_duplicate_original_weights(tiny_llama3_repo, tmp_path):
    out, repo = tmp_path / "llama3", tiny_llama3_repo
    result = _cli(["download", repo.repo_id, "--output-dir", str(out), "--hf-token", repo.token],
                  repo.server.env())
    assert result.returncode == 0, result.stderr
    assert "Skipping original/*.pth (1 file: Meta's copy of the weights the safetensors hold); " \
           "pass --include-original to fetch it too" in result.stdout
    # Everything tune needs: the safetensors and config, and original/'s tiktoken tokenizer.
    assert _downloaded(out) == [f for f in repo.files if f != "original/consolidated.00.pth"]
    assert "original/consolidated.00.pth" not in repo.server.downloads(repo.repo_id)
    data = repo.server.repos[("model", repo.repo_id)].files
    assert all((out / f).read_bytes() == data[f] for f in _downloaded(out))

    converted = _cli_convert(out)
    assert converted.returncode == 0, converted.stderr
    from tune_ckpt import load_native

    expected = load_native(repo.native)
    native = load_native(out / "native_pytorch_model.pt")
    assert native.keys() == expected.keys()
    assert all(native[k].equal(expected[k]) for k in expected)


@pytest.mark.parametrize("how", [["--include-original"], ["--ignore-patterns", "*.md"]])
def test_include_original_or_explicit_patterns_fetch_original(tiny_llama3_repo, tmp_path, how):
    out, repo = tmp_path / "llama3", tiny_llama3_repo
    result = _cli(["download", repo.repo_id, "--output-dir", str(out), "--hf-token", repo.token,
                   *how], repo.server.env())
    assert result.returncode == 0, result.stderr
    assert "Skipping" not in result.stdout
    expected = [f for f in repo.files if not (how[0] == "--ignore-patterns" and
                                              f.endswith(".md"))]
    assert _downloaded(out) == expected


def test_qwen2_and_llama2_repos_come_whole(tiny_qwen2_repo, tiny_meta_repo, tmp_path):
    for repo, token in ((tiny_qwen2_repo, None), (tiny_meta_repo, tiny_meta_repo.token)):
        out = tmp_path / repo.repo_id.replace("/", "_")
        args = ["download", repo.repo_id, "--output-dir", str(out)]
        result = _cli([*args, *(["--hf-token", token] if token else [])], repo.server.env())
        assert result.returncode == 0, result.stderr
        assert "Skipping" not in result.stdout
        assert _downloaded(out) == sorted(repo.files)


def _cli_convert(folder):
    return subprocess.run([*CLI, "convert", "--checkpoint-path", str(folder), "--quiet"],
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------- what arrives is what the Hub lists
WEIGHTS = bytes(range(256)) * 800  # 200 KB: an LFS file (sha256 in the listing)


def _tiny_repo(server):
    return server.add_repo("me/tiny", {"config.json": '{"a": 1}', "model.safetensors": WEIGHTS,
                                       "sub/notes.txt": "notes"})


def _hub_record(out, name):
    return out / ".cache" / "huggingface" / "download" / f"{name}.metadata"


@pytest.mark.parametrize("tamper, message", [
    ({"serve": b"\0" * len(WEIGHTS)},
     "model.safetensors from me/tiny does not match the sha256 the Hub lists ("),
    ({"serve": WEIGHTS[:1000]},
     "model.safetensors from me/tiny: 1,000 bytes arrived where the Hub lists 204,800; "),
    ({"listed_size": len(WEIGHTS) + 1},
     "model.safetensors from me/tiny: 204,800 bytes arrived where the Hub lists 204,801; "),
])
def test_bytes_that_do_not_match_the_listing_are_named_and_deleted(hub_server, tmp_path,
                                                                   tamper, message):
    repo = _tiny_repo(hub_server)
    hub_server.tamper("me/tiny", "model.safetensors", **tamper)
    out = tmp_path / "out"
    args = ["download", "me/tiny", "--output-dir", str(out)]
    result = _cli(args, hub_server.env())
    assert result.returncode == 1
    [line] = _error_lines(result.stderr)
    assert line.startswith(f"tune-ckpt: error: {message}"), line
    assert line.endswith("; deleted: run the same command again to fetch it again (if it fails "
                         "again, the Hub or a proxy on the way serves damaged bytes)"), line
    assert not (out / "model.safetensors").exists(), "a later command would trust it"
    assert not _hub_record(out, "model.safetensors").exists()
    assert (out / "config.json").read_bytes() == repo.files["config.json"]
    repo.served.clear()  # the Hub serves the right bytes again: a plain re-run completes
    repo.listed_sizes.clear()
    assert _cli(args, hub_server.env()).returncode == 0
    assert (out / "model.safetensors").read_bytes() == WEIGHTS


def test_a_small_file_is_checked_against_its_git_blob_id(hub_server, tmp_path):
    _tiny_repo(hub_server)
    hub_server.tamper("me/tiny", "config.json", serve=b'{"a": 2}')  # same size
    with pytest.raises(CheckpointError, match=r"^config.json from me/tiny does not match the "
                                              r"git blob id the Hub lists"):
        download("me/tiny", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("status, reason, fix", [
    (403, "Forbidden", "check the repository id, your token's access and HF_ENDPOINT / proxy "
                       "settings"),
    pytest.param(503, "Service Unavailable", "the Hub failed on its side: run the same command "
                 "again later (finished files are kept)", marks=pytest.mark.slow),  # ~25 s of
])                                                                         # the client's retries
def test_an_error_the_hub_answers_is_named_not_called_a_network_problem(hub_server, tmp_path,
                                                                        status, reason, fix):
    _tiny_repo(hub_server)
    hub_server.fail("me/tiny", "model.safetensors", status, reason)
    with pytest.raises(CheckpointError) as caught:
        download("me/tiny", tmp_path / "out")
    assert str(caught.value) == (
        f"the Hugging Face Hub at {hub_server.url} answered {status} {reason} when asked for "
        f"model.safetensors of me/tiny: {fix}")


def test_a_file_name_outside_the_output_folder_is_its_own_line(hub_server, tmp_path):
    hub_server.add_repo("me/evil", {"config.json": "{}", "../escaped.txt": "x"})
    result = _cli(["download", "me/evil", "--output-dir", str(tmp_path / "out")],
                  hub_server.env())
    assert result.returncode == 1
    assert _error_lines(result.stderr) == [
        f"tune-ckpt: error: me/evil lists a file named '../escaped.txt', which would be written "
        f"outside {tmp_path / 'out'}: refusing to download the repository (ask its owner to "
        "rename the file)"]
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()


def test_links_planted_in_the_download_folder_are_replaced_not_written_through(hub_server,
                                                                               tmp_path):
    import os

    repo = _tiny_repo(hub_server)
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "precious.txt").write_text("the user's own file\n")
    out = tmp_path / "out"
    (out / ".cache").mkdir(parents=True)
    os.symlink(victim / "precious.txt", out / "config.json")
    os.symlink(victim / "precious.txt", out / "model.safetensors")
    os.symlink(victim, out / "sub")
    os.symlink(victim, out / ".cache" / "huggingface")
    download("me/tiny", out)
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (victim / "precious.txt").read_text() == "the user's own file\n"
    for name in repo.files:
        assert (out / name).read_bytes() == repo.files[name], name
    for path in (out / "config.json", out / "model.safetensors", out / "sub",
                 out / ".cache" / "huggingface"):
        assert not path.is_symlink(), path
