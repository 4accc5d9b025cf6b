"""Unpacking an uploaded model folder (tar or zip) without trusting it.

Refused: absolute paths, ``..`` components, links of any kind, device files, more than
``max_files`` members or ``max_bytes`` unpacked, and any file type that is not part of a
safetensors Hugging Face folder (no pickled weights: ``.bin``, ``.pt``, ``.pkl``, ...).
Hidden files and folders (``.gitattributes``) are skipped.
Members are written by us, byte by byte, never by ``extractall``.
"""

from __future__ import annotations

import json
import shutil
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from qsurgeon.client.errors import UsageError

#: the files a safetensors Hugging Face folder consists of
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".md", ".vocab", ".merges", ".tiktoken")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".npy", ".joblib")


class ArchiveError(UsageError):
    """The upload is not an acceptable model archive."""


#: longest member path and path component accepted (file systems refuse longer names)
MAX_MEMBER_PATH = 1024
MAX_NAME_COMPONENT = 200
#: what a broken or unsupported archive raises while it is read, from tarfile, zipfile, gzip
#: and the file system (a truncated stream, an encrypted or unknown-method zip member, a
#: file and a folder of one name, a member written twice)
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, RuntimeError,
                NotImplementedError, ValueError, TypeError, KeyError, IndexError, struct.error)


def _safe_member_path(name: str) -> PurePosixPath:
    if len(name) > MAX_MEMBER_PATH or "\x00" in name:
        raise ArchiveError(f"archive member {name[:80]!r}... has a path longer than {MAX_MEMBER_PATH} characters")
    path = PurePosixPath(name.replace("\\", "/"))
    if any(len(part) > MAX_NAME_COMPONENT for part in path.parts):
        raise ArchiveError(f"archive member {name[:80]!r}... has a name longer than {MAX_NAME_COMPONENT} characters")
    if path.is_absolute() or name.startswith(("/", "\\")) or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts):
        raise ArchiveError(f"archive member {name!r} leaves the archive folder ('..')")
    parts = [part for part in path.parts if part not in ("", ".")]
    if not parts:
        raise ArchiveError(f"archive member {name!r} has an empty path")
    return PurePosixPath(*parts)


def _check_suffix(path: PurePosixPath) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ArchiveError(f"archive member {str(path)!r}: only safetensors weights are accepted, not {suffix}")
    if suffix not in ALLOWED_SUFFIXES:
        raise ArchiveError(f"archive member {str(path)!r}: file type {suffix or '(none)'} is not part of a "
                           f"safetensors model folder (allowed: {', '.join(ALLOWED_SUFFIXES)})")


def _tar_members(handle: BinaryIO) -> Iterator[tuple[str, bool, int, BinaryIO | None]]:
    with tarfile.open(fileobj=handle, mode="r:*") as archive:
        for member in archive:
            if member.issym() or member.islnk():
                raise ArchiveError(f"archive member {member.name!r} is a link; links are refused")
            if member.isdir():
                yield member.name, True, 0, None
                continue
            if not member.isfile():
                raise ArchiveError(f"archive member {member.name!r} is not a regular file")
            yield member.name, False, member.size, archive.extractfile(member)


def _zip_members(handle: BinaryIO) -> Iterator[tuple[str, bool, int, BinaryIO | None]]:
    with zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:
                raise ArchiveError(f"archive member {info.filename!r} is a link; links are refused")
            if info.is_dir():
                yield info.filename, True, 0, None
                continue
            with archive.open(info) as stream:
                yield info.filename, False, info.file_size, stream


def extract_model_archive(source: Path, dest: Path, *, max_bytes: int, max_files: int = 1000) -> Path:
    """Unpack ``source`` (tar, tar.gz or zip) into ``dest``; return the model folder inside.

    An archive holding one top-level folder yields that folder. The result must contain a
    ``config.json`` and at least one ``.safetensors`` file.
    """
    with open(source, "rb") as handle:
        magic = handle.read(4)
        handle.seek(0)
        kind = "zip" if magic.startswith(b"PK") else "tar"
        members = _zip_members(handle) if kind == "zip" else _tar_members(handle)
        try:
            return _extract(members, dest, max_bytes=max_bytes, max_files=max_files)
        except ArchiveError:
            raise
        except _READ_ERRORS as error:
            shutil.rmtree(dest, ignore_errors=True)
            detail = type(error).__name__ if isinstance(error, OSError) else str(error)[:200]
            what = "neither a tar nor a zip archive" if kind == "tar" else "not a readable zip archive"
            raise ArchiveError(f"the model upload is {what}, or it is damaged or uses an unsupported "
                               f"feature ({detail})") from None


def _extract(members: Iterator[tuple[str, bool, int, BinaryIO | None]], dest: Path, *, max_bytes: int,
             max_files: int) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    total = 0
    count = 0
    try:
        for name, is_dir, size, stream in members:
            relative = _safe_member_path(name)
            target = (root / relative).resolve()
            if root not in target.parents and target != root:
                raise ArchiveError(f"archive member {name!r} leaves the archive folder")
            count += 1  # every member counts, folders and skipped ones too
            if count > max_files:
                raise ArchiveError(f"the archive holds more than {max_files} entries")
            if any(part.startswith(".") for part in relative.parts):
                continue  # hidden files (.gitattributes, .cache/) are skipped, never written
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            _check_suffix(relative)
            if target.exists():
                raise ArchiveError(f"archive member {name!r} appears twice (or as a file and a folder)")
            total += size
            if total > max_bytes:
                raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with open(target, "xb") as out:
                while chunk := stream.read(1 << 20):
                    written += len(chunk)
                    if written > size or total - size + written > max_bytes:
                        raise ArchiveError(f"archive member {name!r} is larger than it claims")
                    out.write(chunk)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return _model_folder(root)


def _model_folder(root: Path) -> Path:
    entries = [entry for entry in root.iterdir()]
    folder = entries[0] if len(entries) == 1 and entries[0].is_dir() else root
    if not (folder / "config.json").is_file():
        raise ArchiveError("the archive holds no config.json (upload a Hugging Face model folder)")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ArchiveError("the archive holds no .safetensors weights")
    for path in weights:
        _check_safetensors(path)
    return folder


def _check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header naming at least one
    tensor, then the data the header's offsets cover; anything else (an empty file, a
    truncated one) is refused here instead of loading a model on random weights."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if length <= 0 or 8 + length > size or length > 100 << 20:
            raise ArchiveError(f"{path.name} is not a safetensors file (no valid header)")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise ArchiveError(f"{path.name} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        header = {}
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if not tensors:
        raise ArchiveError(f"{path.name} holds no tensors")
    end = max((int(entry.get("data_offsets", [0, 0])[1]) for entry in tensors.values() if isinstance(entry, dict)),
              default=0)
    if 8 + length + end > size:
        raise ArchiveError(f"{path.name} is truncated (its header describes more data than it holds)")
