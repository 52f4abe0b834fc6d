"""Writing files safely: every file the project writes goes through `replacing(path)`.

The content goes to a temporary file next to the target (`<name>.tmp<pid>`), which replaces the
target only once it is complete: a crash, a kill or a full disk never leaves a half-written
file, and never damages the file that was there. On any error the temporary file is removed;
a full disk becomes one line naming the file (`UserError`).

    with replacing("runs/x/best.pth") as tmp:
        torch.save(state, tmp)

`write_json` and `write_csv` are the two common cases; `check_outputs` refuses, before any work,
to write over an input, a folder or (without --overwrite) an existing file.
"""
import contextlib
import errno
import json
import os

from cli import UserError

TEMP_MARK = ".tmp"  # <name>.tmp<pid>: what a killed writer can leave behind


def _disk_full(err):
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch.save reports a full disk from its C++ writer as a RuntimeError
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "failed writing file" in text
                                              or "No space left" in text)


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path to write; on success it replaces `path`, on any error it is removed."""
    tmp = f"{path}{TEMP_MARK}{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if _disk_full(err):
            raise UserError(f"disk full: cannot write {path} (the disk holding "
                            f"{os.path.dirname(os.path.abspath(path))} has no space left); "
                            f"the earlier files are intact") from None
        raise


def write_json(path, obj):
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def write_csv(frame, path):
    """A pandas DataFrame as CSV (no index), its folder made if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as tmp:
        frame.to_csv(tmp, index=False)


def check_outputs(outputs, inputs=(), overwrite=False):
    """Refuse to write over an input, a folder, or (without --overwrite) an existing file."""
    inputs = {os.path.realpath(p) for p in inputs}
    for path in outputs:
        if os.path.realpath(path) in inputs:
            raise UserError(f"{path} is one of the input files; choose another --output")
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder; --output must be a file path")
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")
