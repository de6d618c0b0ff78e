"""Files and folders: the saved-object format and the atomic writers every part of mixret uses.

A saved object is a folder: config.json (with a "kind") + model.safetensors (+ tokenizer.json). Weights are
read with safetensors only; nothing is ever unpickled. Files are written beside their target and renamed
into place (`atomic_path`, `write_json`); a folder is built under a hidden temporary name (`temp_dir`) and
put in place, replacing an earlier one, by `publish_dir`; `check_out_dir` says whether an output folder may
be replaced.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixret.errors import MixretError
from mixret.version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_temp(directory: Path, name: str) -> str:
    """A temporary file beside the target, with the permissions a plain open() would give."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary file name beside `path`; on success it is renamed to `path`, on failure removed.

    The temporary file has the permissions a plain open() would give (mkstemp's are private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp(path.parent, path.name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # again: a writer may have replaced the file (safetensors does)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's bytes to the disk (before it is renamed into place or acknowledged)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a folder's entries (the renames and new files in it) to the disk."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir(parent: str | os.PathLike, name: str, suffix: str = ".tmp") -> Path:
    """A new hidden folder `.NAME.*SUFFIX` in parent, with ordinary permissions, to be renamed when complete."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=suffix))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished folder `tmp` to `out` by renames, replacing an earlier `out` only now that `tmp` is
    complete (tmp and out must be on the same file system, e.g. tmp from temp_dir(out.parent, ...))."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = temp_dir(out.parent, out.name, suffix=".old")
    os.replace(out, old / "previous")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out: str | os.PathLike, marker: str, kind: str, overwrite: bool, what: str | None = None) -> None:
    """Refuse an output folder that may not be replaced: an existing one unless `overwrite`, and, even then,
    one that is not empty and does not hold a `kind` object (a `marker` JSON file whose "kind" is `kind`)."""
    out = Path(out)
    if not out.exists():
        return
    what = what or f"a {kind}"
    if not out.is_dir():
        raise MixretError(f"{out}: exists and is not a directory; expected a folder for {what}")
    if not overwrite:
        raise MixretError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    holds = (out / marker).is_file() and read_json(out / marker).get("kind") == kind
    if not holds and any(out.iterdir()):
        article = "an" if kind[0] in "aeiou" else "a"
        raise MixretError(f"{out}: exists and does not hold {what} (not {article} {kind} folder: no {marker} of "
                          f"kind {kind!r}); refusing to replace it, choose another output folder or remove it")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path via a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise MixretError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixretError(f"{path}: not valid JSON ({e})") from None


def write_config(directory: str | os.PathLike, kind: str, config: dict) -> None:
    """config.json of a saved object: its kind, the mixret version and its options."""
    write_json(Path(directory) / CONFIG_NAME, {"kind": kind, "mixret_version": __version__, **config})


def read_config(directory: str | os.PathLike, kind: str, what: str, folder: str,
                hints: dict[str, str] | None = None) -> dict:
    """The options in directory/config.json of a saved `kind` object (`what`, kept in a `folder` directory),
    without kind and version; a MixretError naming the file for anything else (hints: kind -> advice)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MixretError(f"{directory}: {folder} directory not found")
    path = directory / CONFIG_NAME
    raw = read_json(path, f"{folder} config")
    found = raw.pop("kind", None)
    raw.pop("mixret_version", None)
    if found != kind:
        raise MixretError(f"{path}: not a mixret {what} (kind={found!r}, expected {kind!r})"
                          f"{(hints or {}).get(found, '')}")
    return raw


def options_from_dict(cls, options: dict, source: str, what: str, required: tuple[str, ...] = ()):
    """cls(**options) for a config dataclass, refusing unknown and missing options with a message naming source."""
    import dataclasses

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise MixretError(f"{source}: unknown {what} option(s) {unknown}")
    for name in required:
        if name not in options:
            raise MixretError(f"{source}: {what} config has no {name}")
    return cls(**options)


def save_weights(module: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write module's parameters and buffers to directory/model.safetensors, atomically.

    Tensors that share storage (tied embeddings) are written once.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seen: dict[tuple, str] = {}
    tensors = {}
    for name, t in module.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else (id(t),)
        if key in seen:
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def load_weights(module: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Fill module from directory/model.safetensors; any missing, extra or misshapen tensor is an error."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise MixretError(f"{path}: weights file not found")
    expected = module.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MixretError(f"{path}: cannot read safetensors file ({e})") from None
    tied = {name for name in expected if name not in stored and _tied_source(module, name) in stored}
    missing = sorted(set(expected) - set(stored) - tied)
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise MixretError(
            f"{path}: does not match {CONFIG_NAME} "
            f"(missing tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected tensors: {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    for name, t in stored.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise MixretError(
                f"{path}: tensor {name} has shape {tuple(t.shape)}, "
                f"{CONFIG_NAME} implies {tuple(expected[name].shape)}"
            )
    module.load_state_dict(stored, strict=False)


def _tied_source(module: torch.nn.Module, name: str) -> str | None:
    """Name of the tensor that `name` shares storage with, if any."""
    sd = module.state_dict()
    t = sd[name]
    for other, u in sd.items():
        if other != name and u.data_ptr() == t.data_ptr() and u.shape == t.shape:
            return other
    return None


def file_hash(path: str | os.PathLike, n: int = 16) -> str:
    """Short sha256 of a file's bytes (identifies a model's weights in meta files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def versioned(name: str, version: int) -> str:
    """The name of an EMB_DIR file in its version `version` (see mixret.retrieval.corpus): "embeddings.safetensors"
    for 0
    (as `mixret embed` and `mixret index` write it), "embeddings.3.safetensors" for 3."""
    if not version:
        return name
    stem, _, rest = name.partition(".")
    return f"{stem}.{version}.{rest}"
