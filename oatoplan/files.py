"""Every file oatoplan writes goes through `write_file`: atomic, and never over a file it must not replace.

A write creates a temp file exclusively in the target's directory (`tempfile.mkstemp`: a fresh random name, O_EXCL,
so a link placed there in advance is never followed), writes, flushes, fsyncs, and `os.replace`s it onto the target;
on any failure (a full disk, an interrupt) the temp file is removed and the old target is left as it was. Before
that it refuses, with one line naming the path:
- an input of the command (same file by inode or by resolved path: `plan M.gguf -o M.gguf`), even with force;
- anything but a regular file (a FIFO, a device, a directory), even with force;
- a symbolic link, unless forced (then the file it points to is replaced);
- an existing file of another kind (a GGUF, a profile when writing a plan, a file oatoplan did not write), unless
  forced. A file of the same kind is replaced: that is what -o means.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError

# Artifact kinds as JSON: the top-level fields that tell each from the others.
JSON_KINDS = {
    "plan": frozenset({"n_gpu_layers", "tensor_overrides"}),
    "profile": frozenset({"profile_id", "ops", "transfers"}),
    "bench": frozenset({"arms", "reps"}),
    "inventory": frozenset({"hparams", "tensors"}),
    "diagnosis": frozenset({"checks"}),
}
DESCRIPTIONS = {
    "plan": "a plan", "profile": "a profile", "bench": "bench results", "inventory": "a model inventory",
    "diagnosis": "a doctor report", "json": "a JSON file", "lp": "an LP file", "markdown": "a markdown table",
    "png": "a PNG image", "gguf": "a GGUF model", "other": "a file oatoplan did not write",
}
GGUF_MAGIC = b"GGUF"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LP_START = b"\\*"                 # pulp's LP files open with a `\* name *\` comment
MAGIC_KINDS = ((GGUF_MAGIC, "gguf"), (PNG_MAGIC, "png"), (LP_START, "lp"))
SPECIAL_FILES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
SNIFF_JSON_MAX_BYTES = 64 << 20   # a larger file is no artifact of ours: not parsed, taken as "other"


@dataclass(frozen=True)
class Output:
    """Where a command writes one file, what it must never write over, and whether the user said --force."""
    path: Path
    inputs: tuple[Path | None, ...] = ()   # the command's input files (None: an input not given, ignored)
    force: bool = False
    option: str = "output"                 # how the user named it, for messages: "-o", "--write-lp"


def as_output(out: Output | str | Path) -> Output:
    return out if isinstance(out, Output) else Output(Path(out))


def companion(path: str | Path, suffix: str) -> Path:
    """The name of a file written beside `path` (bench's .md and .png beside its JSON): `x.json` -> `x<suffix>`,
    any other name gets the suffix appended (`x.md` -> `x.md.md`), so it is never `path` itself."""
    path = Path(path)
    return path.with_suffix(suffix) if path.suffix == ".json" else path.with_name(path.name + suffix)


def file_kind(path: str | Path) -> str:
    """What an existing regular file is: a JSON_KINDS key, "json", "lp", "markdown", "png", "gguf", "empty" or
    "other". Opened without following a link and without blocking (a FIFO swapped in is not waited on)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return "other"
        head = fh.read(8)
        if not head:
            return "empty"
        for magic, kind in MAGIC_KINDS:
            if head.startswith(magic):
                return kind
        if head.lstrip()[:1] == b"|":
            return "markdown"
        if head.lstrip()[:1] != b"{" or st.st_size > SNIFF_JSON_MAX_BYTES:
            return "other"
        try:
            data = json.loads(head + fh.read())
        except (ValueError, RecursionError):   # not UTF-8 / not JSON (ValueError covers both), absurdly nested
            return "other"
    if not isinstance(data, dict):
        return "other"
    return next((kind for kind, fields in JSON_KINDS.items() if fields <= data.keys()), "json")


def describe_mode(mode: int) -> str:
    """What a file that is not a regular file is, for messages: "a FIFO", "a directory"..."""
    return next((name for test, name in SPECIAL_FILES if test(mode)), "not a regular file")


def check_output(out: Output | str | Path, kind: str) -> Path:
    """Refuse `out` for a file of `kind` (see the module docstring); returns the path to replace (the link's target
    when a link is forced). Commands call it before long work so that a refusal comes first, not after."""
    out = as_output(out)
    path = Path(out.path)
    again = f"choose another {out.option} path"
    resolved = os.path.realpath(path)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    for given in out.inputs:
        if given is None:
            continue
        try:
            same = os.path.realpath(given) == resolved or (st is not None and os.path.samestat(os.stat(given), st))
        except OSError:
            same = False
        if same:
            also = "" if Path(given) == path else f" (the same file as {given})"
            raise OutputError(f"{path}: is a file this command also reads or writes{also}; writing there would "
                              f"destroy it; {again}")
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        lst = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror}); {again}") from None
    target = path
    if lst is not None and stat.S_ISLNK(lst.st_mode):
        if not out.force:
            raise OutputError(f"{path}: is a symbolic link (to {os.readlink(path)}); {again} or add --force to "
                              f"replace the file it points to")
        target = Path(resolved)
        lst = st
    if lst is not None:
        if not stat.S_ISREG(lst.st_mode):
            raise OutputError(f"{path}: is {describe_mode(lst.st_mode)}; {again} (a regular file)")
        if not out.force:
            try:
                found = file_kind(target)
            except OSError as exc:
                raise OutputError(f"{path}: cannot read what is there ({exc.strerror}); {again}") from None
            if found not in (kind, "empty"):
                raise OutputError(f"{path}: is {DESCRIPTIONS.get(found, found)}, not {DESCRIPTIONS.get(kind, kind)}; "
                                  f"{again} or add --force to replace it")
    _check_directory(target.parent, path, again)
    return target


def _check_directory(directory: Path, path: Path, again: str) -> None:
    """The directory a new file goes into is (or can be made) a writable directory."""
    existing = directory
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise OutputError(f"{path}: cannot write ({existing} is not a directory); {again}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write (directory {existing} is not writable); {again}")


def write_file(out: Output | str | Path, data: str | bytes, kind: str) -> Path:
    """Write `data` (str: UTF-8) to `out` atomically after check_output; returns the path as given. Raises
    OutputError (one line) on a refusal or a failed write; the target is then unchanged and no temp file is left."""
    out = as_output(out)
    path = Path(out.path)
    target = check_output(out, kind)
    payload = data.encode() if isinstance(data, str) else data
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror}); choose a writable {out.option} path") from None
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), _mode_for(target))
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"choose another {out.option} path"
        raise OutputError(f"{path}: cannot write ({exc.strerror}); nothing was changed there; {hint}") from None
    _fsync_directory(target.parent)
    return path


def _mode_for(target: Path) -> int:
    """The replaced file's permissions, or a new file's (0o666 less the umask; mkstemp's own 0o600 is private)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # read, not set: os.umask() would change it for every thread for a moment
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
