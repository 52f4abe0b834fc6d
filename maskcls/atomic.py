"""Writing files safely: every file the project writes goes through `replacing(path)`.

The content goes to a temporary file next to the target (`<name>.tmp<pid>`), which replaces the
target only once it is complete: a crash, a kill or a full disk never leaves a half-written
file, and never damages the file that was there. On any error the temporary file is removed;
a full disk becomes one line naming the file and the disk (`UserError`).

    with replacing("runs/x/best.pth") as tmp:
        torch.save(state, tmp)

`replacing_all` writes several files as a set (a submission and its probabilities): all of
them, or none. `overwrite=False` never replaces a file that appeared meanwhile (two runs writing
the same new output: the second one fails instead of both reporting success). `write_json` and
`write_csv` are the common cases; `check_outputs` refuses, before any work, to write over an
input, a folder or (without --overwrite) an existing file; `remove_stale_temps` clears what a
killed writer left behind.
"""
import contextlib
import errno
import glob
import json
import os
import re

from maskcls.cli import UserError

TEMP_MARK = ".tmp"  # <name>.tmp<pid>: what a killed writer can leave behind
STALE = re.compile(r"(.+)\.tmp(\d+)$")


def mount_point(path):
    """The mount point (the disk) holding `path`."""
    path = os.path.realpath(os.path.dirname(os.path.abspath(path)) if not os.path.isdir(path) else path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def disk_full(err):
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch.save reports a full disk from its C++ writer as a RuntimeError
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "failed writing file" in text
                                              or "No space left" in text)


def disk_full_error(path):
    return UserError(f"disk full: cannot write {path} (no space left on {mount_point(path)}); "
                     f"nothing was replaced, the earlier files are intact")


def _commit(tmp, path, overwrite):
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails where the file exists: never replaces one
    except FileExistsError:
        raise UserError(f"{path} appeared while this run was writing it (another run writing the same "
                        f"output?); it was left as it is: pass --overwrite or another output") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOTSUP):
            raise
        if os.path.exists(path):  # a file system without hard links: check, then rename
            raise UserError(f"{path} appeared while this run was writing it; it was left as it is") from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


@contextlib.contextmanager
def replacing_all(paths, overwrite=True):
    """Yield one temporary path per target; once the block succeeds they replace the targets
    (renames, which need no space), else they are all removed and no target is touched."""
    temps = [f"{p}{TEMP_MARK}{os.getpid()}" for p in paths]
    try:
        yield temps
        for tmp, path in zip(temps, paths):
            _commit(tmp, path, overwrite)
    except BaseException as err:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if disk_full(err):
            raise disk_full_error(paths[0]) from None
        raise


@contextlib.contextmanager
def replacing(path, overwrite=True):
    """Yield a temporary path to write; on success it replaces `path`, on any error it is removed."""
    with replacing_all([path], overwrite) as (tmp,):
        yield tmp


def write_json(path, obj):
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def write_csv(frame, path):
    """A pandas DataFrame as CSV (no index), its folder made if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_csvs(frames, paths, overwrite=True):
    """Several DataFrames as CSVs, written as a set (replacing_all): all of them, or none."""
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing_all(paths, overwrite) as temps:
        for frame, tmp in zip(frames, temps):
            frame.to_csv(tmp, index=False)


def check_outputs(outputs, inputs=(), overwrite=False):
    """Refuse to write over an input, a folder, or (without --overwrite) an existing file."""
    inputs = {os.path.realpath(p) for p in inputs}
    for path in outputs:
        if os.path.realpath(path) in inputs:
            raise UserError(f"{path} is one of the input files; choose another --output")
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder; --output must be a file path (or use --output_dir)")
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")
        remove_stale_temps(os.path.dirname(os.path.abspath(path)), os.path.basename(path))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder, name=None, owned=False):
    """Remove `<name>.tmp<pid>` files in `folder` (any name when `name` is None) that a killed
    writer left: those whose process is gone, or all of them where the caller holds the
    folder's lock (`owned`: nobody else writes there). Returns the paths removed."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(name) if name else '*'}{TEMP_MARK}*")):
        match = STALE.match(os.path.basename(path))
        if match and os.path.isfile(path) and (owned or not _alive(int(match.group(2)))) \
                and int(match.group(2)) != os.getpid():
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(path)
    return removed
