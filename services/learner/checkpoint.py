"""Checkpoints of a job: `<checkpoint_root>/<job_id>/step-<N>/`, written atomically.

A checkpoint directory holds the student as a plain `save_pretrained` directory (safetensors plus
the tokenizer), so `AutoModelForCausalLM.from_pretrained(dir)` loads it with no Protégé code, and
next to it what a resume needs: `optimizer.pt` (AdamW state), `scheduler.pt` (the learning-rate
schedule's state), `rng.pt` (torch and Python RNG states) and `state.json` (step, data cursor,
policy version). A distributed learner writes its weights from every rank's shards (DCP's
HuggingFaceStorageWriter, consolidated into plain safetensors) and its optimizer's shards into
`optimizer/` instead of `optimizer.pt` (torch.distributed.checkpoint; any world size reads them),
possibly in the background (`begin`, then `complete` once the writes finish). Everything is written
into a hidden temporary directory that is renamed into place only when complete; then `latest`, a
relative symlink to the newest `step-<N>`, is replaced atomically, so
`from_pretrained("<job_dir>/latest")` loads the newest weights. A crash mid-write leaves a `.tmp-*`
directory that readers ignore and the next save removes. (Checkpoints written before `latest` was a
symlink have a pointer file holding the directory's name; it is still read.)

With `keep` (JobSpec.save_total_limit) only the newest `keep` step checkpoints stay, never the one
`latest` names. The job's last checkpoint is also exported to `final/`: the model and tokenizer
only, no optimizer, scheduler or RNG state (about a third of a checkpoint's size with AdamW).
Files are written 0644 and directories 0755 (readable by whoever serves the model next), whatever
the process umask, unless the caller passes other modes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from protege.services.learner import lora

logger = logging.getLogger(__name__)

LATEST = "latest"
FINAL = "final"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.json"
EXPORT_FILE = "export.json"  # in final/: which step and job it was exported from
# What only a resume needs; final/ leaves these out.
RESUME_FILES = frozenset({"optimizer.pt", SCHEDULER_FILE, "rng.pt", STATE_FILE})
RESUME_DIRS = frozenset({"optimizer"})  # a distributed learner's optimizer shards (DCP)
FILE_MODE, DIR_MODE = 0o644, 0o755
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (torch CPU/CUDA and Python's `random`)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Pending:
    """A checkpoint whose files are being written (`begin`); `complete` finishes it."""

    job_dir: Path
    tmp: Path
    step: int
    state: dict[str, Any]
    keep: int
    file_mode: int
    dir_mode: int
    writing: Any = None  # what is still being written in the background (`.result()` waits)


def save(job_dir: str | Path, step: int, model: Any, tokenizer: Any,
         optimizer: torch.optim.Optimizer, state: dict[str, Any],
         scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, keep: int = 0,
         file_mode: int = FILE_MODE, dir_mode: int = DIR_MODE,
         write_shards: Callable[[Path], Any] | None = None) -> Path:
    """Write checkpoint `step` of a job atomically and point `latest` at it; returns its path.
    With `keep` > 0, older checkpoints beyond the newest `keep` are deleted afterwards.

    A sharded student (distributed.py) passes `write_shards(tmp)`: every rank writes its shards of
    the weights (HF safetensors) and of the optimizer (`tmp/optimizer/`) there, returning what is
    still being written (`.result()` waits); the model's config is written here."""
    return complete(begin(job_dir, step, model, tokenizer, optimizer, state, scheduler, keep,
                          file_mode, dir_mode, write_shards))


def begin(job_dir: str | Path, step: int, model: Any, tokenizer: Any,
          optimizer: torch.optim.Optimizer, state: dict[str, Any],
          scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, keep: int = 0,
          file_mode: int = FILE_MODE, dir_mode: int = DIR_MODE,
          write_shards: Callable[[Path], Any] | None = None) -> Pending:
    """Start checkpoint `step` in a hidden temporary directory: everything but `state.json` (the
    scheduler and RNG states are taken now); `write_shards` may still be writing when it
    returns. Nothing is visible until `complete`."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(job_dir)
    tmp = job_dir / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    pending = Pending(job_dir, tmp, step, state, keep, file_mode, dir_mode)
    try:
        if write_shards is not None:  # a world: weights and optimizer from every rank's shards
            model.config.save_pretrained(str(tmp))
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(str(tmp))
            pending.writing = write_shards(tmp)
        elif lora.is_lora(model):  # LoRA: the merged model, and adapter/ for a resume (lora.py)
            lora.save(model, tmp)
        else:
            model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if write_shards is None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(rng_state(), tmp / "rng.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return pending


def complete(pending: Pending) -> Path:
    """Wait for `pending`'s background writes, write `state.json`, rename the directory into
    place and point `latest` at it (then prune); returns its path. A failed write removes the
    temporary directory and raises: the previous checkpoint stays the latest."""
    final = pending.job_dir / step_dir_name(pending.step)
    try:
        if pending.writing is not None:
            pending.writing.result()
        # state.json last: a directory with it is complete.
        (pending.tmp / STATE_FILE).write_text(
            json.dumps({**pending.state, "step": pending.step}, indent=2))
        set_modes(pending.tmp, pending.file_mode, pending.dir_mode)
        _replace_dir(pending.tmp, final)
    except BaseException:
        shutil.rmtree(pending.tmp, ignore_errors=True)
        raise
    _write_pointer(pending.job_dir, final.name)
    if pending.keep > 0:
        prune(pending.job_dir, pending.keep)
    return final


def export_final(job_dir: str | Path, ckpt: str | Path, file_mode: int = FILE_MODE,
                 dir_mode: int = DIR_MODE) -> Path:
    """Export checkpoint `ckpt` as `<job_dir>/final/`: what `from_pretrained` loads, without the
    resume state (optimizer, scheduler, RNG). Files are hard-linked where possible (pruning the
    step checkpoint later leaves final/ intact), else copied. Atomic, like `save`."""
    job_dir, ckpt = Path(job_dir), Path(ckpt)
    tmp = job_dir / f".tmp-{FINAL}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for src in ckpt.rglob("*"):
            rel = src.relative_to(ckpt)
            if rel.parts[0] in RESUME_DIRS:
                continue
            if src.is_dir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
            elif rel.as_posix() not in RESUME_FILES:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(src, tmp / rel)
        state = read_state(ckpt)
        (tmp / EXPORT_FILE).write_text(json.dumps(
            {"step": state.get("step"), "job_id": state.get("job_id"), "from": ckpt.name}))
        set_modes(tmp, file_mode, dir_mode)
        _replace_dir(tmp, job_dir / FINAL)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return job_dir / FINAL


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def set_modes(root: Path, file_mode: int = FILE_MODE, dir_mode: int = DIR_MODE) -> None:
    """chmod `root` and everything under it: directories `dir_mode`, files `file_mode`."""
    os.chmod(root, dir_mode)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


def prune(job_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names);
    returns the paths deleted. Each is renamed to a temp name first, so a crash mid-delete
    leaves nothing that looks like a checkpoint."""
    job_dir = Path(job_dir)
    protected = latest(job_dir)
    found = list_checkpoints(job_dir)
    doomed = [p for _, p in found[:max(0, len(found) - keep)] if p != protected]
    for path in doomed:
        trash = path.with_name(f".tmp-pruned-{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted checkpoint %s (save_total_limit %d)", path, keep)
    return doomed


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an older `final` (a step re-run after a resume) is swapped out."""
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_pointer(job_dir: Path, name: str) -> None:
    """Point `latest` at `name` (a relative symlink, so the job dir can move), atomically."""
    tmp = job_dir / f".{LATEST}.{uuid.uuid4().hex[:8]}"
    os.symlink(name, tmp, target_is_directory=True)
    os.replace(tmp, job_dir / LATEST)


def _remove_stale_temps(job_dir: Path) -> None:
    for p in job_dir.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file() and (path / "config.json").is_file()


def list_checkpoints(job_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a job as (step, path), oldest first; temp dirs are ignored."""
    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        return []
    found = []
    for p in job_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and _complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(job_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer if valid, else the highest step."""
    job_dir = Path(job_dir)
    pointer = job_dir / LATEST
    name = None
    if pointer.is_symlink():
        name = os.readlink(pointer)
    elif pointer.is_file():  # a pointer file, from before `latest` was a symlink
        name = pointer.read_text().strip()
    if name is not None:
        target = job_dir / Path(name).name
        if _STEP_DIR.match(target.name) and _complete(target):
            return target
        logger.warning("checkpoint pointer %s names %s, which is incomplete; scanning", pointer,
                       target.name)
    found = list_checkpoints(job_dir)
    return found[-1][1] if found else None


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


def load_optimizer(ckpt_dir: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """A one-process checkpoint's optimizer (`optimizer.pt`); `distributed.load_optimizer`
    reads either form on any world size."""
    state = torch.load(Path(ckpt_dir) / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)


def load_scheduler(ckpt_dir: str | Path,
                   scheduler: torch.optim.lr_scheduler.LRScheduler) -> bool:
    """Restore the schedule's state (load the optimizer first: it holds the current rate); False
    for a checkpoint written before schedules existed, whose job can only be at a constant rate."""
    path = Path(ckpt_dir) / SCHEDULER_FILE
    if not path.is_file():
        return False
    scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


def load_rng(ckpt_dir: str | Path) -> None:
    set_rng_state(torch.load(Path(ckpt_dir) / "rng.pt", map_location="cpu", weights_only=True))
