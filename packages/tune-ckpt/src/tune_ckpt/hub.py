"""Download a model repository from the Hugging Face Hub (or the endpoint in HF_ENDPOINT).

The revision is resolved to a commit first, with our own request, so that every failure
(gated repo, bad token, unknown repo or revision, hub unreachable) surfaces as one clear
:class:`CheckpointError` before any file is fetched, and so that a re-run after an interrupted
download finds the finished files by commit and fetches only what is missing (huggingface_hub
resumes partial files from where they stopped).

The access token is passed to huggingface_hub and nowhere else: it is never printed, logged or
written to disk by this module.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from tune_ckpt.errors import CheckpointError

_CONNECTION_ERRORS = {"ConnectError", "ConnectionError", "ConnectTimeout", "TimeoutException",
                      "Timeout", "ReadTimeout", "NetworkError", "RemoteProtocolError",
                      "ReadError", "ProxyError", "OfflineModeIsEnabled"}


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


def download(
    repo_id: str,
    output_dir: str | os.PathLike,
    token: str | None = None,
    ignore_patterns: Sequence[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Download every file of a model repository into ``output_dir``, resumably.

    Args:
        repo_id: ``owner/name``, e.g. ``meta-llama/Llama-2-7b``.
        output_dir: Folder to download into (created if missing). Files already downloaded
            from the same commit are not fetched again; partial files are resumed.
        token: Access token. None uses ``HF_TOKEN`` or the token stored by ``hf auth login``.
        ignore_patterns: Glob patterns of repository files to skip, e.g. ``["*.safetensors"]``.
        revision: Branch, tag or commit (default: the default branch).

    Returns:
        The output folder.

    Raises:
        CheckpointError: Gated repository without access, rejected token, repository or
            revision not found, hub unreachable, or no disk space left.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import get_token

    output_dir = Path(output_dir).expanduser()
    patterns = list(ignore_patterns) if ignore_patterns else None
    token_given = bool(token or get_token())
    try:
        # Resolve the commit ourselves: one request that fails clearly, and a commit id lets
        # huggingface_hub skip files already downloaded from that commit without asking again.
        info = HfApi().model_info(repo_id, revision=revision, token=token)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = snapshot_download(
            repo_id, revision=info.sha, local_dir=output_dir, token=token,
            ignore_patterns=patterns,
        )
    except Exception as e:
        explained = _explain(e, repo_id, revision, token_given, output_dir)
        if explained is None:
            raise
        raise explained from e
    return Path(path)
