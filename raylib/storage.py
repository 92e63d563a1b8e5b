"""Where runs live: a local path, a shared filesystem path, or a URI (s3://, gs://, ...).

Multi-node runs need storage every node can reach. Ray Train/Tune already persist
checkpoints through a pyarrow filesystem (`RunConfig(storage_path=, storage_filesystem=)`),
so raylib resolves `output.dir` to the same kind of filesystem once (`resolve`) and hands it
to Ray; raylib's own files (job.yaml, metrics.jsonl, run.json, the published expert) go
through the same filesystem with the helpers below.

URIs: whatever `pyarrow.fs.FileSystem.from_uri` understands (s3://, gs://, hdfs://,
file://), else any fsspec protocol (wrapped in pyarrow's `FSSpecHandler`). Credentials come
from the environment only (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE, an instance
role, GOOGLE_APPLICATION_CREDENTIALS, ...); a URI carrying a key or secret is rejected,
because the job YAML is copied into every run directory and logged. For S3-compatible
servers set AWS_ENDPOINT_URL (honoured here even where pyarrow itself would not).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from raylib.errors import ConfigError

# query parameters pyarrow/fsspec accept that carry secrets
_SECRET_KEYS = ("access_key", "secret", "token", "password", "credential", "key_id", "sas")


def is_uri(path: str | None) -> bool:
    return bool(path) and "://" in path and not path.startswith("file://")


@dataclass
class Location:
    """A resolved storage location: `fs` is a pyarrow filesystem (None = local disk)."""

    uri: str  # what the user wrote (local paths: absolute)
    fs: object | None
    path: str  # the path inside `fs` (a bucket path for s3: "bucket/run")

    @property
    def is_remote(self) -> bool:
        return self.fs is not None

    def join(self, *parts: str) -> "Location":
        if not self.is_remote:
            return Location(os.path.join(self.uri, *parts), None, os.path.join(self.path, *parts))
        return Location(posixpath.join(self.uri, *parts), self.fs, posixpath.join(self.path, *parts))

    # Ray's RunConfig arguments
    def ray_storage(self) -> dict:
        return {"storage_path": self.path, "storage_filesystem": self.fs} if self.is_remote else {"storage_path": self.path}


def check_no_credentials(uri: str, field: str) -> None:
    """A URI must not carry credentials (user:secret@, ?access_key=...)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        raise ConfigError(field, f"the URI {_redact(uri)} carries credentials",
                          "remove them from the URI; raylib reads credentials from the environment "
                          "(e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    for key, _ in parse_qsl(parts.query):
        if any(s in key.lower() for s in _SECRET_KEYS):
            raise ConfigError(field, f"the URI {_redact(uri)} carries a credential ({key}=...)",
                              "drop it from the URI and set it in the environment instead")


def _redact(uri: str) -> str:
    parts = urlsplit(uri)
    netloc = parts.hostname or ""
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?..." if parts.query else "")


def resolve(path: str, field: str = "output.dir") -> Location:
    """A path or URI -> Location. Raises ConfigError for a URI no filesystem handles."""
    if path.startswith("file://"):
        path = urlsplit(path).path
    if not is_uri(path):
        path = os.path.abspath(os.path.expanduser(path))
        return Location(path, None, path)
    check_no_credentials(path, field)
    fs, inner = _filesystem(path, field)
    return Location(path.rstrip("/"), fs, inner.rstrip("/"))


def _filesystem(uri: str, field: str):
    import pyarrow.fs as pafs

    scheme = urlsplit(uri).scheme
    if scheme == "s3":
        return _s3(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as arrow_exc:  # not a pyarrow scheme: try fsspec
        try:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(uri)
        except Exception as exc:
            raise ConfigError(field, f"no filesystem handles {_redact(uri)}: {arrow_exc}; fsspec: {exc}",
                              "use a local path, s3://, gs://, or install the fsspec package for this scheme") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def _s3(uri: str):
    """pyarrow's S3 filesystem with the endpoint from AWS_ENDPOINT_URL(_S3) when set."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = query.pop("endpoint_override", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {}
    if endpoint:
        ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = ep.netloc
        kwargs["scheme"] = ep.scheme
    region = query.pop("region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    fs = pafs.S3FileSystem(**kwargs)
    return fs, (parts.netloc + parts.path).rstrip("/")


# --------------------------------------------------------------------------- checks


def probe(loc: Location, field: str = "output.dir") -> None:
    """Write and delete a small object under `loc`: wrong bucket, missing credentials or a
    read-only location fail here, before any cluster resources are spent."""
    name = f".raylib-probe-{uuid.uuid4().hex[:8]}"
    if not loc.is_remote:
        try:  # in the directory, or in its nearest existing parent (nothing is left behind)
            parent = loc.path
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                raise NotADirectoryError(20, f"{parent!r} is a file")
            shutil.rmtree(tempfile.mkdtemp(prefix=name, dir=parent))
        except OSError as exc:
            raise ConfigError(field, f"{loc.uri!r} is not writable ({exc.strerror or exc})",
                              "choose a directory this user can write to") from None
        return
    target = posixpath.join(loc.path, name)
    try:
        with loc.fs.open_output_stream(target) as f:
            f.write(b"probe")
        loc.fs.delete_file(target)
    except Exception as exc:
        hint = "" if _has_credentials(loc.uri) else "no credentials found in the environment; "
        raise ConfigError(field, f"cannot write to {loc.uri}: {hint}{_one_line(exc)}",
                          "check that the bucket exists and that the environment holds credentials allowed to "
                          "write there (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, AWS_ENDPOINT_URL "
                          "for S3-compatible servers; GOOGLE_APPLICATION_CREDENTIALS for gs://)") from None


def _has_credentials(uri: str) -> bool:
    """Whether the environment names credentials for this scheme (a hint for the error only:
    instance roles and workload identity have none and still work)."""
    scheme = urlsplit(uri).scheme
    if scheme == "s3":
        names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI")
        return any(os.environ.get(n) for n in names) or os.path.exists(os.path.expanduser("~/.aws/credentials"))
    if scheme in ("gs", "gcs"):
        return bool(os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")) or os.path.exists(
            os.path.expanduser("~/.config/gcloud/application_default_credentials.json"))
    return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


# --------------------------------------------------------------------------- files


def exists(loc: Location, *parts: str) -> bool:
    target = loc.join(*parts) if parts else loc
    if not target.is_remote:
        return os.path.exists(target.path)
    import pyarrow.fs as pafs

    return target.fs.get_file_info(target.path).type != pafs.FileType.NotFound


def is_file(loc: Location, *parts: str) -> bool:
    target = loc.join(*parts) if parts else loc
    if not target.is_remote:
        return os.path.isfile(target.path)
    import pyarrow.fs as pafs

    return target.fs.get_file_info(target.path).type == pafs.FileType.File


def read_text(loc: Location, *parts: str) -> str:
    target = loc.join(*parts) if parts else loc
    if not target.is_remote:
        with open(target.path) as f:
            return f.read()
    with target.fs.open_input_stream(target.path) as f:
        return f.read().decode()


def write_text(loc: Location, name: str, text: str) -> None:
    """Write `name` under `loc` (atomically on local disk; object stores are atomic per object)."""
    target = loc.join(name)
    if not target.is_remote:
        os.makedirs(os.path.dirname(target.path), exist_ok=True)
        with open(target.path + ".tmp", "w") as f:
            f.write(text)
        os.replace(target.path + ".tmp", target.path)
        return
    with target.fs.open_output_stream(target.path) as f:
        f.write(text.encode())


def upload_file(local: str, loc: Location, name: str) -> None:
    target = loc.join(name)
    if not target.is_remote:
        os.makedirs(os.path.dirname(target.path), exist_ok=True)
        shutil.copy2(local, target.path + ".tmp")
        os.replace(target.path + ".tmp", target.path)
        return
    import pyarrow.fs as pafs

    pafs.copy_files(local, target.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target.fs)


def upload_dir(local_dir: str, loc: Location, last: str | None = None) -> None:
    """Copy a local directory's contents to `loc`; the file named `last` is copied last
    (expert.json marks a complete expert)."""
    files = []
    for root, _, names in os.walk(local_dir):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), local_dir))
    files.sort(key=lambda rel: rel == last)
    for rel in files:
        upload_file(os.path.join(local_dir, rel), loc, rel)


def download_dir(loc: Location, local_dir: str, exclude: tuple[str, ...] = ()) -> str:
    """Copy everything under `loc` to `local_dir` (created), except the top-level entries
    named in `exclude` (a run's `checkpoints/` when only its expert is wanted)."""
    os.makedirs(local_dir, exist_ok=True)
    if not loc.is_remote:
        shutil.copytree(loc.path, local_dir, dirs_exist_ok=True, ignore=lambda d, names: [
            n for n in names if os.path.samefile(d, loc.path) and n in exclude])
        return local_dir
    import pyarrow.fs as pafs

    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)):
        rel = posixpath.relpath(info.path, loc.path)
        if info.type != pafs.FileType.File or rel.split("/", 1)[0] in exclude:
            continue
        dest = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with loc.fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return local_dir


def delete_file(loc: Location, name: str) -> None:
    target = loc.join(name)
    try:
        if target.is_remote:
            target.fs.delete_file(target.path)
        else:
            os.remove(target.path)
    except (FileNotFoundError, OSError):
        pass


def staging_dir(loc: Location) -> str:
    """Where the driver keeps files it appends to (metrics.jsonl) for a remote run: a local
    directory per run URI, uploaded at the end. Local runs write in place."""
    if not loc.is_remote:
        return loc.path
    import hashlib

    key = hashlib.sha1(loc.uri.encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), "raylib-staging", key)
    os.makedirs(path, exist_ok=True)
    return path
