"""Byte-level text every machine has: the Python standard library's own source files.

Files are read as bytes (vocabulary 256) at run time. So nothing is downloaded or shipped.
Each file goes wholly to train or to held-out. A stable hash of its path decides which. The
path is taken relative to the stdlib root. So the machine's file order does not change the
split. Nor does `max_bytes`. And no held-out window can overlap a training file. Another
slice of the same hash fixes the order files are read in. Reading stops once `max_bytes` are
read. So a cap takes a spread of the library, not its alphabetical start.

Letters in array names: B batch, L window length (tokens per example).
"""

import dataclasses
import hashlib
import os
import sysconfig

import numpy as np

VOCAB_SIZE = 256
# Not the standard library proper (installed packages) or large, repetitive test suites.
SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


@dataclasses.dataclass(frozen=True)
class TextSplit:
    """Bytes of the train and held-out files, each concatenated in read order (uint8)."""

    train: np.ndarray
    heldout: np.ndarray
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    root: str


def stdlib_root() -> str:
    """The running interpreter's standard-library folder."""
    return sysconfig.get_paths()["stdlib"]


def list_files(root: str) -> list[str]:
    """Paths of the *.py files under `root`, sorted.

    Paths are relative to `root`, with '/' separators. Folders named in SKIP_DIRS are not
    entered; symlinked folders are not followed.
    """
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        rel = os.path.relpath(folder, root)
        for name in files:
            if name.endswith(".py"):
                path = name if rel == "." else os.path.join(rel, name)
                found.append(path.replace(os.sep, "/"))
    return sorted(found)


def _hash_fractions(rel_path: str) -> tuple[float, float]:
    """Two independent numbers in [0, 1) from the path: (split draw, read-order draw)."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    scale = float(2**64)
    return (
        int.from_bytes(digest[:8], "big") / scale,
        int.from_bytes(digest[8:16], "big") / scale,
    )


def is_heldout(rel_path: str, heldout_fraction: float) -> bool:
    """Whether the file at `rel_path` is held out: about `heldout_fraction` of files are."""
    return _hash_fractions(rel_path)[0] < heldout_fraction


def load_split(max_bytes: int, heldout_fraction: float, root: str | None = None) -> TextSplit:
    """Reads up to `max_bytes` bytes of *.py files under `root` (default: the stdlib).

    A bad value raises a ValueError naming config.train.max_text_bytes or heldout_fraction.
    So does finding no file. So does an empty side of the split.
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
        raise ValueError(
            f"config.train.max_text_bytes must be a positive integer, got {max_bytes!r}"
        )
    if (
        not isinstance(heldout_fraction, (int, float))
        or isinstance(heldout_fraction, bool)
        or not 0 < heldout_fraction < 1
    ):
        raise ValueError(
            f"config.train.heldout_fraction must lie in (0, 1), got {heldout_fraction!r}"
        )
    root = stdlib_root() if root is None else root
    files = list_files(root) if os.path.isdir(root) else []
    if not files:
        raise ValueError(
            f"no *.py files found under {root!r} (the Python standard library, "
            "sysconfig.get_paths()['stdlib']): training text comes from there"
        )
    files.sort(key=lambda path: _hash_fractions(path)[1])
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    total = 0
    for path in files:
        if total >= max_bytes:
            break
        with open(os.path.join(root, path), "rb") as f:
            data = f.read(max_bytes - total)
        if not data:
            continue
        heldout = is_heldout(path, heldout_fraction)
        parts[heldout].append(data)
        names[heldout].append(path)
        total += len(data)
    for heldout, side in ((False, "train"), (True, "held-out")):
        if not parts[heldout]:
            raise ValueError(
                f"the {side} split is empty ({len(files)} files under {root!r}, "
                f"{total} bytes read): raise config.train.max_text_bytes={max_bytes} or move "
                f"config.train.heldout_fraction={heldout_fraction} away from 0 and 1"
            )
    return TextSplit(
        train=np.frombuffer(b"".join(parts[False]), np.uint8),
        heldout=np.frombuffer(b"".join(parts[True]), np.uint8),
        train_files=tuple(names[False]),
        heldout_files=tuple(names[True]),
        root=root,
    )


def sample_batch(
    data: np.ndarray, batch: int, length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """B random windows of L + 1 bytes -> (inputs_BxL, targets_BxL), int32.

    targets[b, t] = inputs[b, t + 1] within a window: the next byte. Window starts are drawn
    uniformly from `rng`. So the same generator state gives the same batch.
    """
    for name, value in (("batch", batch), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if data.size < length + 1:
        raise ValueError(
            f"the text has {data.size} bytes, fewer than a window of seq_len + 1 = {length + 1}"
        )
    starts_B = rng.integers(0, data.size - length, size=batch)
    windows_BxL1 = data[starts_B[:, None] + np.arange(length + 1)].astype(np.int32)
    return windows_BxL1[:, :-1], windows_BxL1[:, 1:]
