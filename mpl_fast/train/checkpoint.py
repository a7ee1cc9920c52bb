"""Checkpoints: everything a run needs to continue exactly, written atomically."""
import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: one-line message."""


_saves = {}


def _fault_hook(path: Path):
    """Test hook: MPL_FAST_FAULT=kill-during-save:NAME:N kills the process during the N-th save
    of the file NAME, after the temporary file is written and before it replaces the old one."""
    _saves[path.name] = _saves.get(path.name, 0) + 1
    fault = os.environ.get("MPL_FAST_FAULT", "")
    if fault.startswith("kill-during-save:"):
        _, name, count = fault.split(":")
        if name == path.name and _saves[path.name] == int(count):
            os._exit(137)


def does_not_fit(path, err: Exception) -> CheckpointError:
    """A checkpoint whose tensors or keys do not match the models and state built for it."""
    return CheckpointError(f"checkpoint {path} does not fit this run "
                           f"({str(err).splitlines()[0]})")


def _reason(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror  # e.g. "No space left on device"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def save(state: dict, path: Path):
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at
    any moment leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:  # a full disk: torch's writer raises RuntimeError
        tmp.unlink(missing_ok=True)  # the space back; the previous checkpoint stays as it was
        raise CheckpointError(f"cannot write checkpoint {path} ({_reason(err)}); the previous "
                              f"one, if any, is unchanged") from err
    _fault_hook(path)

    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path, mmap: bool = False) -> dict:
    """mmap: tensors stay in the file until used (reading a field or two of a large one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({type(err).__name__})") from err
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not an mpl-fast checkpoint")
    return state


def check_compatible(state: dict, config: dict, path: Path):
    """The parts of the config that shape the models and data must match the checkpoint's; where
    and how the run executes (config.EXECUTION_KEYS: the data's folder, the compiler, DALI's
    placement) may differ."""
    from mpl_fast.train.config import EXECUTION_KEYS, ConfigError, from_saved

    try:  # keys added since the checkpoint was written take their defaults
        saved = from_saved(state.get("config", {}))
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot read "
                              f"({err})") from err
    for section, keys in (("method", None), ("model", None), ("data", None)):
        a, b = saved.get(section), config.get(section)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                              and f"{section}.{k}" not in EXECUTION_KEYS)
                if not diff:
                    continue
                raise CheckpointError(f"checkpoint {path} was written with other {section} "
                                      f"settings ({', '.join(f'{section}.{k}' for k in diff)})")
            raise CheckpointError(f"checkpoint {path} was written with {section}={a!r}, "
                                  f"not {b!r}")
