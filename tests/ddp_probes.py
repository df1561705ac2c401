"""Test-only instruments for multi-process runs (tests/test_ddp.py).

- `install_write_audit`: a Python audit hook (PEP 578) that logs every file-system change this
  process attempts (opens for writing, renames, removals, new folders, ...) as JSON lines. The
  test installs it from a generated `sitecustomize.py`, so it is active from interpreter start in
  every Python process of the run (Lightning starts rank 1 as a fresh `python scripts/train.py`
  that inherits the environment), and its file descriptor is inherited by forked children
  (DataLoader workers, the cache's decoding pool), whose changes land in the same log.
- `DataProbe`: a callback that records, per rank, which (index, crop draw) items the training
  loader fetched in each epoch, which validation items it evaluated, and the logged `val/*`
  metrics, into `OUT/rank{global_rank}.json`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from probes import FirstBatchProbe

#: Environment variable naming the folder of the audit logs; the hook is installed only when set.
AUDIT_ENV = "MUSICVAE_TEST_WRITE_AUDIT"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
#: Audit events (https://docs.python.org/3/library/audit_events.html) that change the file system,
#: with the positions of their path arguments.
_CHANGES = {
    "os.rename": (0, 1),  # also raised by os.replace
    "os.remove": (0,),  # also os.unlink
    "os.mkdir": (0,),
    "os.rmdir": (0,),
    "os.truncate": (0,),
    "os.link": (0, 1),
    "os.symlink": (0, 1),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.utime": (0,),
    "shutil.copyfile": (0, 1),
    "shutil.copytree": (0, 1),
    "shutil.move": (0, 1),
    "shutil.rmtree": (0,),
}


def _path(value: Any) -> str:
    if isinstance(value, int):
        return f"<fd {value}>"
    value = os.fsdecode(value)
    return os.path.abspath(value)


def install_write_audit(folder: str) -> None:
    """Log this process's (and its forked children's) file-system changes to `folder/audit-PID.jsonl`.

    An audit hook cannot be removed, and it sees Python-level operations only. The one native
    writer on this project's paths, torch.save to a file name (PyTorchFileWriter opens the file
    itself), is reported through a wrapper; any other native code writing through its own `fopen`
    would go unseen (tests/test_ddp.py also checks that every file of a run was seen written).
    """
    log = os.path.join(folder, f"audit-{os.getpid()}.jsonl")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # before the hook: not logged
    busy = False

    def emit(record: dict) -> None:
        record.update(pid=os.getpid(), ppid=os.getppid())
        os.write(fd, (json.dumps(record) + "\n").encode())  # one O_APPEND write: whole lines across forks

    def hook(event: str, args: tuple) -> None:
        nonlocal busy
        if busy:
            return
        if event == "open":
            path, _mode, flags = args
            if path is None or not flags & _WRITE_FLAGS:
                return
            paths = [_path(path)]
        elif event in _CHANGES:
            paths = [_path(args[i]) for i in _CHANGES[event] if i < len(args) and args[i] is not None]
        else:
            return
        busy = True
        try:
            record = {"event": event, "paths": paths}
            if event == "os.mkdir":
                # Path.mkdir(exist_ok=True) on an existing folder still raises the event; it changes nothing.
                record["existed"] = os.path.isdir(paths[0])
            emit(record)
        finally:
            busy = False

    emit({"event": "start", "argv": sys.orig_argv, "env": {k: os.environ.get(k) for k in
                                                           ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}})
    sys.addaudithook(hook)

    import torch

    native_writer = torch._C.PyTorchFileWriter

    def file_writer(target, *args, **kwargs):
        if isinstance(target, (str, bytes, os.PathLike)):
            hook("open", (target, "wb", os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        return native_writer(target, *args, **kwargs)

    torch._C.PyTorchFileWriter = file_writer


def read_audit(folder: Path) -> dict[int, list[dict]]:
    """{pid of the process that installed the hook: its records (forked children's included)}."""
    logs = {}
    for path in sorted(Path(folder).glob("audit-*.jsonl")):
        logs[int(path.stem.split("-")[1])] = [json.loads(line) for line in path.read_text().splitlines()]
    return logs


class DataProbe(Callback):
    """Records on each rank what it trained and validated on, and the `val/*` metrics it logged.

    The training and validation datasets are given a subclass whose `__getitem__` notes each item
    it is asked for: what the loader really fetched, not what a sampler would predict. That needs
    the items fetched in this process: `data.num_workers` must be 0.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.record: dict[str, Any] = {"pid": os.getpid(), "train": {}, "val_items": {}, "val_metrics": {}}
        self.trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        data = trainer.datamodule
        if data.num_workers != 0:
            raise RuntimeError("DataProbe sees fetches in the main process only: run with data.num_workers 0")
        self.trainer = trainer
        self.record.update(
            global_rank=trainer.global_rank, local_rank=trainer.local_rank, world_size=trainer.world_size,
            train_len=len(data.train_set), val_len=len(data.val_set),
            train_items=data.train_set.items.tolist(), val_items_rows=data.val_set.items.tolist(),
        )
        self._watch(data.train_set, "train")
        self._watch(data.val_set, "val_items")

    def _watch(self, dataset, key: str) -> None:
        probe, base = self, type(dataset)

        def __getitem__(ds, item):
            probe._note(key, item)
            return base.__getitem__(ds, item)

        dataset.__class__ = type(f"Watched{base.__name__}", (base,), {"__getitem__": __getitem__})

    def _note(self, key: str, item) -> None:
        trainer = self.trainer
        if key == "val_items" and trainer.sanity_checking:
            return
        item = list(item) if isinstance(item, tuple) else [item, None]
        self.record[key].setdefault(str(trainer.current_epoch), []).append(item)

    def on_validation_end(self, trainer, pl_module) -> None:
        # Not on_validation_epoch_end: callbacks run that hook before the module's, and the
        # epoch's logged values are reduced (synced across ranks) only after it.
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.record["val_metrics"][str(trainer.current_epoch)] = metrics
        self._dump()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._dump()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._dump()

    def _dump(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.record['global_rank']}.json").write_text(json.dumps(self.record))


class LinearPathProbe(FirstBatchProbe):
    """Saves, at each rank's first training batch, the linear path the first step will start from
    (after the module's `on_train_start` fitted PCA on rank 0 and broadcast it), into
    `OUT/rank{global_rank}.pt`."""

    def record(self, trainer, pl_module) -> None:
        import torch

        vae = pl_module.vae
        state = {"pca_initialised": vae.pca_initialised.clone(), "lin_encoder": vae.lin_encoder.weight.detach().clone(),
                 "lin_decoder": vae.lin_decoder.weight.detach().clone(),
                 "logvar_bias": vae.inner.to_latent.bias.detach().clone()}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")
