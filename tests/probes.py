"""Test-only callbacks, importable by class path from CLI flags (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class FirstBatchProbe(Callback):
    """Calls `record(trainer, pl_module)` once, at the first training batch of a run (after
    `on_train_start`, before the first step): what that step will actually use."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.done:
            self.done = True
            self.record(trainer, pl_module)

    def record(self, trainer, pl_module) -> None:
        raise NotImplementedError


class FirstStepProbe(FirstBatchProbe):
    """Records the learning rates, loss weights and optimizer state of the first step."""

    def record(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        record = {
            "lr": [group["lr"] for group in optimizer.param_groups],
            "beta": float(pl_module.hparams.beta),
            "spectral_weight": float(pl_module.hparams.spectral_weight),
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
        }
        self.out.write_text(json.dumps(record))
        torch.save(optimizer.state_dict(), self.out.with_suffix(".optim.pt"))


class ValHistory(Callback):
    """Appends (epoch, val/loss, last.ckpt epoch, best.ckpt epoch) once each epoch's checkpoints are saved.

    Recorded at the next epoch's start and at the end of fit: ModelCheckpoint callbacks run
    after all others in the same hook, so the epoch's own end is too early.
    """

    def __init__(self, out: str, checkpoint_dir: str) -> None:
        self.out = Path(out)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.pending = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.pending = (trainer.current_epoch, float(trainer.callback_metrics["val/loss"]))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._flush()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.pending is None:
            return
        rows = json.loads(self.out.read_text()) if self.out.exists() else []
        epochs = {}
        for name in ("last", "best"):
            path = self.checkpoint_dir / f"{name}.ckpt"
            epochs[name] = torch.load(path, weights_only=True)["epoch"] if path.exists() else None
        epoch, val = self.pending
        rows.append({"epoch": epoch, "val": val, **epochs})
        self.out.write_text(json.dumps(rows))
        self.pending = None


class SignalAtStep(Callback):
    """Sends this process `signal` (e.g. SIGKILL, SIGTERM) as training step `step` starts (on
    every rank, or only on global rank `rank`)."""

    def __init__(self, step: int, signal: str = "SIGKILL", rank: int = -1) -> None:
        self.step = step
        self.signal = signal
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (-1, trainer.global_rank):
            import os
            import signal

            os.kill(os.getpid(), getattr(signal, self.signal))


class PoisonAtStep(Callback):
    """Makes training step `step` go non-finite: `what` = "input" (a NaN in the batch, so
    every loss part is NaN), "gradient" (an Inf in one gradient after a finite loss) or
    "weights" (a NaN written into a weight after the step, past every gradient check)."""

    def __init__(self, step: int, what: str = "input", times: int = 1) -> None:
        self.step, self.what, self.times = step, what, times

    def _due(self, trainer) -> bool:
        return self.step <= trainer.global_step < self.step + self.times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.what == "input" and self._due(trainer):
            batch[0, 0, 0, 0] = float("nan")

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.what == "gradient" and self._due(trainer):
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.what == "weights" and self._due(trainer):
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


class StepRecorder(Callback):
    """Appends, per training step, a digest of the batch and of torch's random state (JSON lines)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib

        record = {
            "step": trainer.global_step,
            "batch": hashlib.sha1(batch.detach().cpu().numpy().tobytes()).hexdigest()[:12],
            "rng": hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12],
            "weights": hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.parameters())).hexdigest()[:12],
        }
        with open(self.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class LossRecorder(Callback):
    """Writes the training loss of every step to a JSON list (for comparing precisions)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.out.write_text(json.dumps(self.losses))


class SpoilDuringTraining(Callback):
    """After `at_step` training steps, deletes one array and truncates another in place."""

    def __init__(self, delete: str, truncate: str, at_step: int = 3) -> None:
        self.delete, self.truncate, self.at_step = Path(delete), Path(truncate), at_step
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done or trainer.global_step < self.at_step:
            return
        self.done = True
        self.delete.unlink()
        with open(self.truncate, "r+b") as handle:
            handle.truncate(self.truncate.stat().st_size // 2)


class PredictedSources(Callback):
    """Writes, per rank, the recordings that rank encoded in `predict` (rank{r}.json under `out`)."""

    def __init__(self, out: str) -> None:
        self.out, self.sources = Path(out), []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.sources.append(batch["source"])

    def on_predict_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.sources))


class RecordStepMetrics(Callback):
    """Appends, per training batch, the global step it started at and the logged step values of `keys` (JSON lines)."""

    def __init__(self, out: str, keys: list[str]) -> None:
        self.out, self.keys = Path(out), list(keys)
        self.started = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json

        metrics = trainer.callback_metrics
        row = {"start": self.started, "end": trainer.global_step,
               **{k: float(metrics[f"{k}_step"]) for k in self.keys if f"{k}_step" in metrics}}
        with self.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


class WeightsAtStart(Callback):
    """Saves the module's weights, the optimizers' state sizes and the normaliser when training starts."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer, pl_module) -> None:
        normalizer = trainer.datamodule.normalizer
        torch.save({"state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                    "optimizer_state_sizes": [len(o.state) for o in trainer.optimizers],
                    "global_step": trainer.global_step, "mean": normalizer.mean, "std": normalizer.std,
                    "n_mels": trainer.datamodule.mel.n_mels}, self.out)


class CountingProbe(Callback):
    """A stateful callback (it counts training batches into checkpoints), as EMA or a profiler is:
    Lightning refuses two stateful callbacks of one type, so a list that doubles on resume fails."""

    def __init__(self, label: str = "probe") -> None:
        self.label = label
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.batches = state_dict["batches"]


class MediaWeights(Callback):
    """At each validation's end, where MediaLogger draws: the module's state (weights and buffers) and
    the first batch's reconstructions (from validation_step's output, as MediaLogger takes them) with
    their compensated outputs, by global step."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.records: dict[int, dict] = {}
        self.kept = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self.kept = (batch[:4].detach().cpu(), outputs["reconstruction"][:4].detach().float().cpu())

    def on_validation_end(self, trainer, pl_module) -> None:
        kept, self.kept = self.kept, None
        if trainer.sanity_checking or kept is None:
            return
        inputs, outputs = kept
        self.records[trainer.global_step] = {
            "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "inputs": inputs.clone(), "outputs": outputs.clone(),
            "compensated": pl_module.compensated(outputs.to(pl_module.device), 1.0).cpu()
            if bool(pl_module.gain_fitted) else None,
        }
        torch.save(self.records, self.out)


class LearningRates(Callback):
    """Every training step's learning rate of each parameter group of the first optimizer, as JSON."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.rates: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append([group["lr"] for group in trainer.optimizers[0].param_groups])
        self.out.write_text(json.dumps(self.rates))


class WaitAtStep(Callback):
    """At training step `step`: writes `marker` (holding the process id) and waits until the file
    `marker`.go exists, so a test can signal the run at a known step, from outside, as a user would.
    Under DDP only global rank `rank` waits (the others then wait for it in the step's collective)."""

    def __init__(self, step: int, marker: str, rank: int = 0) -> None:
        self.step = step
        self.marker = Path(marker)
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        import os
        import time

        self.marker.write_text(str(os.getpid()))
        go = self.marker.with_suffix(".go")
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class DiskFaultAtStep(Callback):
    """As training step `step` starts, the machine fails the folder `folder`: "fill" its disk (a
    file of zeros until the write fails), "readonly" (remount the filesystem mounted at `mount`
    read-only) or "delete" it."""

    def __init__(self, step: int, action: str, folder: str, mount: str = "") -> None:
        self.step, self.action, self.folder, self.mount = step, action, Path(folder), mount

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        import shutil
        import subprocess

        if self.action == "fill":
            from musicvae.benchmarks.commands.reliability import fill

            fill(self.folder)
        elif self.action == "readonly":
            subprocess.run(["mount", "-o", "remount,ro", self.mount], check=True)
        else:
            shutil.rmtree(self.folder)


class DieOrStallAtStep(Callback):
    """As training step `step` starts, global rank `kill` SIGKILLs itself and global rank `stall`
    sleeps `seconds` (outside any collective, as rank 0 is while it writes a checkpoint)."""

    def __init__(self, step: int, kill: int = -1, stall: int = -1, seconds: float = 60.0) -> None:
        self.step, self.kill, self.stall, self.seconds = step, kill, stall, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        import os
        import signal
        import time

        if trainer.global_rank == self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer.global_rank == self.stall:
            time.sleep(self.seconds)
