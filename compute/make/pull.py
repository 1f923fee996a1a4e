"""`hobbit-cli pull`: a GGUF model from the Hugging Face Hub into the models folder.

huggingface_hub does the talking: `HfApi.model_info` lists the repo's files at one commit
with each file's size and LFS sha256, and its `http_get` fetches /resolve/{commit}/{file}
(token, redirects, Range on a retry, tqdm bars). This module adds:
- which files: the GGUF model of a quant (every part of a split one, never an mmproj);
- resuming across runs: huggingface_hub 2.x downloads into a process-unique temporary
  file and deletes it when the download fails, so a killed pull would start again from
  zero. The bytes stay here in MODELS/.pull/<sha256>.part instead (named by content: a
  file changed upstream never resumes onto stale bytes) and http_get continues at their end;
- verification: each file's sha256, read back from disk, against the Hub's;
- arrival in one step: parts are renamed into the models folder (same file system as
  .pull) only once every part is verified.
Library errors are HobbitErrors of one line; the CLI (apps/pull_cli.py) prints them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

from ...hobbitd.config import models_dir
from ...loader.gguf_split import split_name
from ...protocol.errors import HobbitError, InputError, ModelError
from ..progress import progress_bar

STAGING = ".pull"  # inside the models folder: partial downloads, kept for resuming
READ_CHUNK = 1 << 23  # bytes per read when hashing

# A quant label as llama.cpp's quantizer and the Hub's uploaders write it in file names:
# Q4_K_M, IQ2_XXS, Q8_0, TQ1_0, MXFP4, BF16, F16 ..., unsloth's dynamic ones as UD-Q4_K_XL.
QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|MXFP4(?:_MOE)?"
    r"|BF16|FP16|F16|F32|FP8))(?![A-Za-z0-9])",
    re.IGNORECASE,
)
SHA256_RE = re.compile(r"[0-9a-f]{64}")
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PullError(HobbitError):
    """The Hub cannot be reached or answers with an error, the disk refuses the bytes."""

    code = "pull_failed"


@dataclass(frozen=True)
class PullOptions:
    repo: str  # Hub model repo id, owner/name
    quant: str | None = None  # Q4_K_M ... (any case); None: the repo's only GGUF model
    file: str | None = None  # one exact file of the repo (a split one: all its parts)
    revision: str | None = None  # branch, tag or commit; None: the default branch
    progress: bool = True  # tqdm bars on a terminal's stderr


class RemoteFile(NamedTuple):
    path: str  # in the repo, folders included
    size: int | None  # bytes; None when the Hub's listing does not say
    sha256: str | None  # the LFS object's sha256; None for a plain git file


class RemoteModel(NamedTuple):
    parts: tuple[RemoteFile, ...]  # in part order; one file when not split
    quant: str | None  # its quant label (QUANT_RE), None if its name has none


@dataclass(frozen=True)
class Pulled:
    path: str  # the first part in the models folder: what chat, generate
    # and hobbitd open
    files: tuple[str, ...]  # every part, in order
    total_bytes: int
    fetched_bytes: int  # downloaded by this pull (0: all parts were there already)
    commit: str  # the repo commit the files are from


def parse_ref(ref: str) -> tuple[str, str | None]:
    """REPO[:QUANT] as (repo, quant); an hf.co/ or https://huggingface.co/ prefix is dropped."""
    ref = re.sub(r"^(?:https?://)?(?:hf\.co|huggingface\.co)/", "", ref.strip())
    repo, _, quant = ref.partition(":")
    if not REPO_RE.match(repo):
        raise InputError(f"{ref!r}: not a Hub model repo id (owner/name, e.g. unsloth/Qwen3-30B-A3B-GGUF:Q4_K_M)")
    return repo, quant or None


def quant_label(path: str) -> str | None:
    """The quant a GGUF's name says (the last label in it), else its folder's name if that is one."""
    split = split_name(path)
    stem = split.stem if split else re.sub(r"\.gguf$", "", os.path.basename(path), flags=re.I)
    found = QUANT_RE.findall(stem)
    if found:
        return found[-1]
    folder = os.path.basename(os.path.dirname(path))
    return folder if QUANT_RE.fullmatch(folder) else None


def gguf_models(files: list[RemoteFile]) -> list[RemoteModel]:
    """The repo's GGUF models: each split set one model (parts in order), each other .gguf
    one; mmproj files (vision projectors) are no model of their own."""
    groups: dict[tuple, list[RemoteFile]] = {}
    for f in files:
        name = os.path.basename(f.path)
        if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj"):
            continue
        split = split_name(f.path)
        key = (os.path.dirname(f.path), split.stem, split.parts) if split else (f.path,)
        groups.setdefault(key, []).append(f)
    models = []
    for parts in groups.values():
        parts.sort(key=lambda f: f.path)  # part numbers are zero-padded
        models.append(RemoteModel(tuple(parts), quant_label(parts[0].path)))
    return sorted(models, key=lambda m: m.parts[0].path)


def _quants(models: list[RemoteModel]) -> str:
    labels = {m.quant or os.path.basename(m.parts[0].path) for m in models}
    return ", ".join(sorted(labels, key=str.upper))


def choose(repo: str, files: list[RemoteFile], quant: str | None, file: str | None) -> RemoteModel:
    """The model `quant` or `file` names among the repo's files (see PullOptions); InputError
    of one line listing what there is when none or several fit."""
    models = gguf_models(files)
    if file is not None:
        if quant is not None:
            raise InputError(f"{repo}:{quant} --file {file}: give a quant or a file, not both")
        named = [f for f in files if f.path == file]
        if not named or not file.lower().endswith(".gguf"):
            what = "no GGUF file" if not named else "a file but not a GGUF:"
            raise InputError(f"{repo} has {what} {file} (its GGUF models: {_names(models)})")
        found = [m for m in models if named[0] in m.parts]
        model = found[0] if found else RemoteModel((named[0],), quant_label(file))  # an mmproj
    elif not models:
        raise InputError(f"{repo} has no GGUF model file")
    elif quant is None:
        if len(models) > 1:
            raise InputError(
                f"{repo} has {len(models)} GGUF models; name a quant as {repo}:QUANT, one of: {_quants(models)}"
            )
        model = models[0]
    else:
        fits = [m for m in models if m.quant and m.quant.upper() == quant.upper()]
        if not fits:  # a quant inside a longer label or a folder's name: Q4_K_XL in UD-Q4_K_XL/
            token = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(quant)}(?![A-Za-z0-9_])", re.I)
            fits = [m for m in models if token.search(m.parts[0].path)]
        if not fits:
            raise InputError(f"{repo} has no {quant} GGUF; quants there: {_quants(models)}")
        if len(fits) > 1:
            raise InputError(f"{repo}:{quant} fits {len(fits)} models ({_names(fits)}); pick one with --file")
        model = fits[0]
    split = split_name(model.parts[0].path)
    if split and [split_name(p.path).no for p in model.parts] != list(range(1, split.parts + 1)):
        have = ", ".join(str(split_name(p.path).no) for p in model.parts)
        raise InputError(f"{repo}: {model.parts[0].path} is split in {split.parts} parts but the repo has parts {have}")
    return model


def _names(models: list[RemoteModel]) -> str:
    return ", ".join(m.parts[0].path for m in models) or "none"


# ---- fetching ------------------------------------------------------------------------------


def pull(opts: PullOptions) -> Pulled:
    """Download the model `opts` names into models_dir() (see the module docstring). A part
    already there at its size is kept. Raises InputError (no such repo, quant, file),
    ModelError (a sha256 mismatch: that part's downloaded bytes are removed) or PullError
    (network, Hub, disk); the bytes of an interrupted download stay for the next pull."""
    from huggingface_hub import HfApi, hf_hub_url

    try:
        info = HfApi().model_info(opts.repo, revision=opts.revision, files_metadata=True)
        commit = info.sha or opts.revision or "main"  # every part from the same commit
        files = [
            RemoteFile(s.rfilename, s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else None)
            for s in info.siblings or []
        ]
        model = choose(opts.repo, files, opts.quant, opts.file)
        urls = [hf_hub_url(opts.repo, p.path, revision=commit) for p in model.parts]
        parts = [_with_metadata(p, url) for p, url in zip(model.parts, urls)]
        return _fetch_model(opts, list(zip(parts, urls)), commit, models_dir())
    except HobbitError:
        raise
    except Exception as e:
        raise _one_line(e, opts) from None


def _with_metadata(part: RemoteFile, url: str) -> RemoteFile:
    """`part` with its size and sha256, from the HEAD of its /resolve url (X-Linked-Size,
    X-Linked-Etag) where the repo listing lacks them (a mirror without LFS metadata)."""
    if part.size is None or part.sha256 is None:
        from huggingface_hub import get_hf_file_metadata

        meta = get_hf_file_metadata(url)
        etag = meta.etag if meta.etag and SHA256_RE.fullmatch(meta.etag) else None
        part = RemoteFile(part.path, part.size if part.size is not None else meta.size, part.sha256 or etag)
    if part.size is None or part.sha256 is None or not SHA256_RE.fullmatch(part.sha256):
        raise PullError(
            f"{part.path}: the Hub gives no sha256 or no size for it (not an LFS file?), so it cannot be verified"
        )
    return part


def _fetch_model(opts: PullOptions, parts: list[tuple[RemoteFile, str]], commit: str, folder: str) -> Pulled:
    """Fetch and verify each (part, url) not in `folder` yet, then rename them all into it."""
    staging = os.path.join(folder, STAGING)
    dests = [os.path.join(folder, os.path.basename(p.path)) for p, _ in parts]
    todo = [(p, url, d) for (p, url), d in zip(parts, dests) if not _already_there(p, d)]
    staged = [os.path.join(staging, f"{p.sha256}.part") for p, _, _ in todo]
    os.makedirs(folder, exist_ok=True)
    missing = sum(p.size - _size(s) for (p, _, _), s in zip(todo, staged))
    free = shutil.disk_usage(folder).free
    if missing > free:
        raise PullError(f"{folder}: {size_text(missing)} more needed, {size_text(free)} free")
    os.makedirs(staging, exist_ok=True)
    fetched = 0
    with ExitStack() as stack:  # every part stays locked until all are in place
        handles = [stack.enter_context(_Locked(s, p.path)) for (p, _, _), s in zip(todo, staged)]
        for (p, url, _), s, f in zip(todo, staged, handles):
            fetched += _fetch(url, p, f, opts.progress)
            got = _sha256(s, p.size, os.path.basename(p.path), opts.progress)
            if got != p.sha256:  # verified parts before it stay staged for the next pull
                _remove(s)
                _remove_empty(staging)
                raise ModelError(
                    f"{opts.repo}/{p.path}: sha256 {got[:16]}… is not the Hub's "
                    f"{p.sha256[:16]}… (the download is removed; pull again)"
                )
        for (_, _, dest), s in zip(todo, staged):
            os.replace(s, dest)
    _sync_dir(folder)
    _remove_empty(staging)
    return Pulled(dests[0], tuple(dests), sum(p.size for p, _ in parts), fetched, commit)


def _already_there(part: RemoteFile, dest: str) -> bool:
    """A part pulled before (its size; rehashing a model of 100 GB each time takes minutes).
    PullError for another file of the same name."""
    if not os.path.exists(dest):
        return False
    if os.path.getsize(dest) == part.size:
        return True
    raise PullError(
        f"{dest}: exists and is not {part.path} ({os.path.getsize(dest)} bytes, "
        f"the Hub's has {part.size}); move it away first"
    )


class _Locked:
    """The staged file of a part, open for appending, locked against a second pull of it."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name

    def __enter__(self):
        self.f = open(self.path, "ab")
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise PullError(f"{self.name}: another hobbit-cli pull is downloading it (into {self.path})") from None
        return self.f

    def __exit__(self, *exc):
        self.f.close()


def _fetch(url: str, part: RemoteFile, f, progress: bool) -> int:
    """Append to `f` (a part's staged bytes) up to its size; return the bytes fetched."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    from huggingface_hub.utils.tqdm import silent_tqdm

    have = f.tell()  # opened for appending: at the end
    if have > part.size:  # not a prefix of this part: start again
        f.seek(0)
        f.truncate()
        have = 0
    if have == part.size:
        return 0
    http_get(
        url,
        f,
        resume_size=have,
        headers=build_hf_headers(),
        expected_size=part.size,
        displayed_filename=os.path.basename(part.path),
        tqdm_class=None if progress else silent_tqdm,
    )
    f.flush()
    os.fsync(f.fileno())  # verified bytes are renamed into place: they must be on disk
    return part.size - have


def _sha256(path: str, size: int, name: str, progress: bool) -> str:
    """The sha256 of the file at `path` (`name` for its bar), read back from disk."""
    h = hashlib.sha256()
    with open(path, "rb") as f, progress_bar(size, f"sha256 {name}", progress, unit="B") as bar:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def size_text(n: int) -> str:
    """Bytes for people: GiB from one GiB on, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _remove_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:  # not empty: another model's partial download waits there
        pass


def _sync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(e: Exception, opts: PullOptions) -> HobbitError:
    """huggingface_hub's, httpx2's and the OS's errors as one line naming what failed."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = constants.ENDPOINT
    if isinstance(e, HFValidationError):
        return InputError(f"{opts.repo}: {_first_line(e)}")
    if isinstance(e, GatedRepoError):
        return InputError(f"{opts.repo} is gated: accept its terms on the Hub, then set HF_TOKEN")
    if isinstance(e, RepositoryNotFoundError):
        return InputError(f"{opts.repo}: no such model repo at {hub} (a private one needs HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return InputError(f"{opts.repo}: no revision {opts.revision}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        return PullError(f"{hub} answered HTTP {status} ({_first_line(e)})")
    if isinstance(e, OfflineModeIsEnabled):
        return PullError("HF_HUB_OFFLINE is set: pull needs the network")
    if isinstance(e, httpx2.HTTPError):
        return PullError(
            f"cannot reach {hub}: {_first_line(e) or type(e).__name__} (no network? HF_ENDPOINT?); pull again to resume"
        )
    if isinstance(e, OSError) and e.errno is not None:
        where = e.filename or models_dir()
        hint = "; pull again to resume" if e.errno == errno.ENOSPC else ""
        return PullError(f"{where}: {e.strerror}{hint}")
    if isinstance(e, OSError):  # http_get's size check: the server sent too few or many bytes
        return PullError(f"{opts.repo}: {_first_line(e)}")
    raise e


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")
