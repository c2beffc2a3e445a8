"""Download a model repository from the Hugging Face Hub (or the endpoint in HF_ENDPOINT).

The revision is resolved to a commit first, with our own request, so that every failure
(gated repo, bad token, unknown repo or revision, hub unreachable) surfaces as one clear
:class:`CheckpointError` before any file is fetched, and so that a re-run after an interrupted
download finds the finished files by commit and fetches only what is missing (huggingface_hub
resumes partial files from where they stopped).

The access token is passed to huggingface_hub and nowhere else: it is never printed, logged or
written to disk by this module. A token pasted with its line ending (``--hf-token "$(cat
token.txt)"`` of a CRLF file) is stripped; one with a character no token has is refused by a
message that does not show it; and :func:`hide_tokens` is what the command-line tools pass
every error message through, so that no message (a traceback from the HTTP layer included)
shows a token.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

from tune_ckpt.errors import CheckpointError

_CONNECTION_ERRORS = {"ConnectError", "ConnectionError", "ConnectTimeout", "TimeoutException",
                      "Timeout", "ReadTimeout", "NetworkError", "RemoteProtocolError",
                      "ReadError", "ProxyError", "OfflineModeIsEnabled"}


# Where huggingface_hub looks for a token when none is given, in its order.
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

# An HTTP Authorization header as an error message may quote it: the credential after it.
_BEARER = re.compile(r"(Bearer\s+)[^\s'\"]+", re.IGNORECASE)


def clean_token(token: str, source: str = "the access token",
                fix: str = "copy the token again (https://huggingface.co/settings/tokens)",
                ) -> str:
    """The token without surrounding whitespace; refused if a character no token has is left.

    Args:
        token: As given (a flag's value, an environment variable).
        source: What to call it in the message, e.g. ``"--hf-token"``.
        fix: What the message tells the user to do.

    Returns:
        The token, stripped.

    Raises:
        CheckpointError: If it is empty or holds a control character, a space or a non-ASCII
            character; the message says which and where, never the token.
    """
    stripped = token.strip()
    if not stripped:
        raise CheckpointError(f"{source} is empty: {fix}")
    for position, char in enumerate(stripped, start=1):
        if not "!" <= char <= "~":  # printable ASCII, the only characters of a token
            kind = ("a space" if char == " " else "a non-ASCII character" if char > "~"
                    else "a control character")
            raise CheckpointError(
                f"{source} holds {kind} at position {position}, which no access token has: "
                f"{fix}"
            )
    return stripped


def tokens_to_hide(*given: str | None) -> list[str]:
    """The tokens a message must not show: those given plus the environment's.

    Args:
        given: Tokens as the user gave them (None and empty ones are skipped).

    Returns:
        Every such token, as given and stripped. Values shorter than a few characters are
        left out: they are no real token, and hiding them would garble the message (hiding
        a one-letter "token" would hide every such letter).
    """
    values = [*given, *(os.environ.get(name) for name in TOKEN_VARIABLES)]
    out: list[str] = []
    for value in values:
        if value and len(value.strip()) >= _SHORTEST_HIDDEN:
            out += [value, value.strip()]
    return list(dict.fromkeys(out))


_SHORTEST_HIDDEN = 6


def hide_tokens(text: str, tokens: Iterable[str]) -> str:
    """``text`` with every token in it, and every ``Bearer`` credential, replaced by ``***``.

    A token shows up in messages as written, or escaped as Python writes it inside a
    ``repr`` (``hf_x\\r``), which is how the HTTP layer quotes a header it refused.

    Args:
        text: A message, a traceback.
        tokens: Tokens to hide (see :func:`tokens_to_hide`).

    Returns:
        The text, safe to print.
    """
    forms = set()
    for token in tokens:
        forms |= {token, repr(token)[1:-1], repr(token.encode("utf-8", "replace"))[2:-1]}
    for form in sorted((f for f in forms if f), key=len, reverse=True):
        text = text.replace(form, "***")
    return _BEARER.sub(r"\1***", text)


def _check_environment_token() -> None:
    # huggingface_hub reads this variable itself; check it here, where a bad one can be
    # named without showing it.
    for name in TOKEN_VARIABLES:
        value = os.environ.get(name)
        if value and value.strip():
            clean_token(value, name)
            return


def _stored_token_problem() -> CheckpointError | None:
    """Why the token huggingface_hub found on its own (its login file) could not be sent.

    huggingface_hub reads that file itself. A damaged one makes the HTTP layer refuse the
    request with an error that quotes the token, or the Hub refuse the token: either way the
    damage is the cause to name.
    """
    from huggingface_hub.utils import get_token

    stored = get_token()
    try:
        if stored:
            clean_token(stored, "the token saved by `hf auth login`",
                        fix="run `hf auth login` again, or pass a token with --hf-token")
    except CheckpointError as problem:
        return problem
    return None


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _explain(e: BaseException, repo_id: str, revision: str | None, token_given: bool,
             output_dir: Path) -> CheckpointError | None:
    """Translate a huggingface_hub / network / disk error into the line a user needs."""
    from huggingface_hub import errors as hf_errors

    page = f"{_endpoint()}/{repo_id}"
    how = "pass a token with --hf-token (or set HF_TOKEN, or run `hf auth login`)"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CheckpointError(
            f"could not write to {output_dir}: {os.strerror(e.errno)}; free some disk space or "
            "choose another --output-dir, then run the same command again to resume"
        )
    if isinstance(e, hf_errors.GatedRepoError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401 or not token_given:
            return CheckpointError(
                f"{repo_id} is a gated repository and needs an access token: request access "
                f"on {page}, then {how}"
            )
        return CheckpointError(
            f"your token has no access to the gated repository {repo_id}: request access on "
            f"{page} (approval can take a while) and use a token of the approved account"
        )
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return CheckpointError(
            f"revision '{revision}' not found in {repo_id}: check the branch, tag or commit "
            f"name on {page}"
        )
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return CheckpointError(
            f"repository {repo_id} not found on {_endpoint()}: check the id (owner/name); if "
            f"it is private, {how}"
        )
    if isinstance(e, hf_errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return CheckpointError(
                "the Hugging Face Hub rejected your access token (invalid or expired): create "
                "a new one at https://huggingface.co/settings/tokens and pass it with "
                "--hf-token or HF_TOKEN"
            )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return CheckpointError(f"the Hugging Face Hub answered an error for {repo_id}: {first}")
    if isinstance(e, hf_errors.HFValidationError):
        return CheckpointError(f"'{repo_id}' is not a valid repository id: write it as owner/name")
    answered = _http_answer(e)
    if answered is not None:
        return _answer_error(answered, repo_id)
    names = {cls.__name__ for cls in type(e).__mro__}
    if names & _CONNECTION_ERRORS or isinstance(e, hf_errors.LocalEntryNotFoundError):
        return CheckpointError(
            f"cannot reach the Hugging Face Hub at {_endpoint()}: check your network connection "
            "(and HF_ENDPOINT / proxy settings), then run the same command again"
        )
    if isinstance(e, OSError) and e.strerror:
        where = e.filename or output_dir
        return CheckpointError(f"could not write to {where}: {e.strerror}")
    return None


def _http_answer(e: BaseException):
    """The HTTP response behind an error, if the server answered at all.

    huggingface_hub retries a file whose request fails and then raises "cannot find the
    file on the Hub or in the cache" (LocalEntryNotFoundError) from the last HTTP error: the
    server's answer is in the chain of causes, and it, not the network, is what to report.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if getattr(response, "status_code", None) is not None:
            return response
        e = e.__cause__ or e.__context__
    return None


def _answer_error(response, repo_id: str) -> CheckpointError:
    status = response.status_code
    reason = getattr(response, "reason_phrase", "") or ""
    path = str(getattr(getattr(response, "request", None), "url", "") or "")
    what = f"{path.split('/resolve/', 1)[1].split('/', 1)[-1]} of {repo_id}" \
        if "/resolve/" in path else repo_id
    said = (response.headers.get("X-Error-Message") or "").strip()
    said = f" ({said})" if said and said.lower() != reason.lower() else ""
    if status >= 500:
        fix = ("the Hub failed on its side: run the same command again later (finished files "
               "are kept)")
    elif status == 429:
        fix = "too many requests: wait a few minutes, then run the same command again"
    else:
        fix = "check the repository id, your token's access and HF_ENDPOINT / proxy settings"
    return CheckpointError(f"the Hugging Face Hub at {_endpoint()} answered {status} {reason}"
                           f"{said} when asked for {what}: {fix}".replace("  ", " "))


# --- what the Hub lists, and checking what arrived against it ---------------------------------


def _listing(repo_id: str, commit: str, token: str | None, patterns: list[str] | None,
             output_dir: Path) -> list:
    """The repository's files (huggingface_hub ``RepoFile``: path, size, blob_id, lfs) that
    the download fetches, with their sizes and checksums; a path that would land outside
    ``output_dir`` is refused here, before any file is fetched."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    files = [f for f in HfApi().list_repo_tree(repo_id, recursive=True, revision=commit,
                                               token=token) if isinstance(f, RepoFile)]
    for f in files:
        parts = PurePosixPath(f.path.replace("\\", "/")).parts
        if PurePosixPath(f.path).is_absolute() or ".." in parts or ":" in f.path:
            raise CheckpointError(
                f"{repo_id} lists a file named '{f.path}', which would be written outside "
                f"{output_dir}: refusing to download the repository (ask its owner to rename "
                "the file)"
            )
    return list(filter_repo_objects(files, ignore_patterns=patterns, key=lambda f: f.path))


# huggingface_hub's bookkeeping inside a download folder (per-file metadata, partial files).
_HUB_STATE = Path(".cache") / "huggingface"
_VERIFIED = _HUB_STATE / "tune_verified.json"


def _remove_planted_links(output_dir: Path, files: list) -> None:
    """Unlink every symbolic link where the download writes, so nothing is written through
    one: a download makes only plain files and folders, so a link there was planted (it is
    removed, never followed; what it points at is left alone)."""
    for f in files:
        here = output_dir
        for part in PurePosixPath(f.path).parts:
            here = here / part
            if here.is_symlink():
                here.unlink()
                break
    here = output_dir
    for part in _HUB_STATE.parts:
        here = here / part
        if here.is_symlink():
            here.unlink()
            return
    if here.is_dir():
        for root, folders, names in os.walk(here):
            for name in folders + names:
                if (Path(root) / name).is_symlink():
                    (Path(root) / name).unlink()


def _verify(output_dir: Path, repo_id: str, files: list, progress: bool) -> None:
    """Check every fetched file against the size and checksum the Hub lists for it.

    LFS files (the weights) against their sha256, others against their git blob id. A file
    that does not match is deleted (with huggingface_hub's record of it, so that a re-run
    fetches it again) and the first is named. Files already checked are recorded in
    ``.cache/huggingface/tune_verified.json`` by size and modification time, so a re-run
    does not hash a finished download again.
    """
    import json

    from tqdm.auto import tqdm

    from tune_ckpt.writing import write_text_atomic

    record_path = output_dir / _VERIFIED
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    bad: list[str] = []
    todo = []
    for f in files:
        local = output_dir / f.path
        expected = f.lfs.sha256 if f.lfs is not None else f.blob_id
        size = f.lfs.size if f.lfs is not None else f.size
        stat = local.lstat() if local.exists() else None
        if stat is None:
            continue  # huggingface_hub raised already if a file did not arrive
        if stat.st_size != size:
            bad.append(f"{f.path} from {repo_id}: {stat.st_size:,} bytes arrived where the "
                       f"Hub lists {size:,}")
            _discard(output_dir, f.path)
            continue
        if record.get(f.path) == [expected, size, stat.st_mtime_ns] or expected is None:
            continue
        todo.append((f, local, expected, size, stat.st_mtime_ns))
    with tqdm(total=sum(t[3] for t in todo), unit="B", unit_scale=True, unit_divisor=1024,
              desc="Checking checksums", disable=None if progress else True, leave=False) as bar:
        for f, local, expected, size, mtime in todo:
            found = _checksum(local, size, lfs=f.lfs is not None, bar=bar)
            if found != expected:
                kind = "sha256" if f.lfs is not None else "git blob id"
                bad.append(f"{f.path} from {repo_id} does not match the {kind} the Hub lists "
                           f"({expected[:12]}..., the bytes that arrived give {found[:12]}...)")
                _discard(output_dir, f.path)
                record.pop(f.path, None)
            else:
                record[f.path] = [expected, size, mtime]
    if todo:
        write_text_atomic(record_path, json.dumps(record, indent=1) + "\n")
    if bad:
        more = f" (and {len(bad) - 1} more file{'s' if len(bad) > 2 else ''})" if len(bad) > 1 \
            else ""
        raise CheckpointError(f"{bad[0]}{more}; deleted: run the same command again to fetch "
                              "it again (if it fails again, the Hub or a proxy on the way serves "
                              "damaged bytes)")


def _checksum(path: Path, size: int, *, lfs: bool, bar) -> str:
    import hashlib

    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _discard(output_dir: Path, path: str) -> None:
    # The file and huggingface_hub's record that it is complete: a re-run fetches it anew.
    (output_dir / path).unlink(missing_ok=True)
    (output_dir / _HUB_STATE / "download" / f"{path}.metadata").unlink(missing_ok=True)


# Meta's Llama 3 repositories hold the weights twice: safetensors at the top (what tune
# converts) and Meta's consolidated.*.pth under original/ (as many gigabytes again). The rest
# of original/ stays: its tokenizer.model is the tiktoken file tune's Llama 3 tokenizer reads.
ORIGINAL_WEIGHTS = "original/*.pth"


def duplicate_original(files: Sequence[str]) -> list[str]:
    """Meta's weight files under ``original/`` when the repository has safetensors at the top
    level too (they hold the same model); empty otherwise (Llama 2's repositories have
    Meta's files only)."""
    top_level = any("/" not in f and f.endswith(".safetensors") for f in files)
    if not top_level:
        return []
    return [f for f in files if fnmatch.fnmatch(f, ORIGINAL_WEIGHTS)]


def download(
    repo_id: str,
    output_dir: str | os.PathLike,
    token: str | None = None,
    ignore_patterns: Sequence[str] | None = None,
    revision: str | None = None,
    include_original: bool = False,
    notify: Callable[[str], None] | None = None,
    progress: bool = True,
) -> Path:
    """Download the files of a model repository tune needs into ``output_dir``, resumably.

    That is every file, except that a repository holding the weights twice (safetensors at
    the top, Meta's ``original/consolidated.*.pth`` beside them, as Meta's Llama 3
    repositories do) gets the safetensors only, unless ``include_original`` or
    ``ignore_patterns`` say otherwise. The rest of ``original/`` (params.json, the tiktoken
    tokenizer.model) is fetched.

    Args:
        repo_id: ``owner/name``, e.g. ``meta-llama/Llama-2-7b``.
        output_dir: Folder to download into (created if missing). Files already downloaded
            from the same commit are not fetched again; partial files are resumed.
        token: Access token. None uses ``HF_TOKEN`` or the token stored by ``hf auth login``.
        ignore_patterns: Glob patterns of repository files to skip, e.g. ``["*.safetensors"]``.
            Given, they replace the default skip of ``original/*.pth``.
        revision: Branch, tag or commit (default: the default branch).
        include_original: Fetch ``original/*.pth`` too when the safetensors are there.
        notify: Called with one line when they are skipped (``print`` in the CLI).
        progress: Show a progress bar while checksums are checked.

    Returns:
        The output folder.

    Every file fetched is checked against the size and checksum (sha256 for LFS files)
    the Hub lists for it; one that does not match is deleted and named. A symbolic link
    where the download writes is removed first, never written through.

    Raises:
        CheckpointError: A token with a character no token has (given or in HF_TOKEN), gated
            repository without access, rejected token, repository or revision not found, hub
            unreachable or answering an error, a file that does not match its checksum or
            size, a file name that would land outside output_dir, or no disk space left.
    """
    if token is not None:
        token = clean_token(token)
    else:
        _check_environment_token()
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import get_token

    output_dir = Path(output_dir).expanduser()
    patterns = list(ignore_patterns) if ignore_patterns else None
    token_given = bool(token or get_token())
    try:
        # Resolve the commit ourselves: one request that fails clearly, and a commit id lets
        # huggingface_hub skip files already downloaded from that commit without asking again.
        info = HfApi().model_info(repo_id, revision=revision, token=token)
        skipped = [] if patterns or include_original else \
            duplicate_original([s.rfilename for s in info.siblings or []])
        if skipped:
            patterns = [ORIGINAL_WEIGHTS]
            if notify is not None:
                notify(f"Skipping {ORIGINAL_WEIGHTS} ({len(skipped)} file"
                       f"{'s' if len(skipped) > 1 else ''}: Meta's copy of the weights the "
                       "safetensors hold); pass --include-original to fetch it too")
        files = _listing(repo_id, info.sha, token, patterns, output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        _remove_planted_links(output_dir, files)
        path = snapshot_download(
            repo_id, revision=info.sha, local_dir=output_dir, token=token,
            ignore_patterns=patterns,
        )
        _verify(output_dir, repo_id, files, progress)
    except CheckpointError:
        raise
    except Exception as e:
        explained = _stored_token_problem() if token is None else None
        if explained is None:
            explained = _explain(e, repo_id, revision, token_given, output_dir)
        if explained is None:
            raise
        raise explained from e
    return Path(path)
