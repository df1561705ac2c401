"""Stopping cleanly: on a NaN/Inf before it reaches the weights, and on SIGTERM (preemption).

- NonFiniteGuard looks at the loss and the gradients after each backward pass, before the
  optimizer uses them. A non-finite one stops training with the step and the part named (the
  module's `loss_parts` of the batch, recomputed only then), or skips the batch, up to
  `--skip_nonfinite N` times. Nothing is saved on the way out, and
  AtomicCheckpointIO refuses non-finite weights anyway, so `last.ckpt` and `best.ckpt` stay
  the last finite ones.
- Preemption: on SIGTERM the current step finishes on every rank, then Lightning raises
  SIGTERMException (by itself it saves nothing and exits 0). This writes `last.ckpt` when the
  weights are finite; the command line then exits 143 (128 + SIGTERM), which schedulers read
  as preempted. The command line's runs treat a first Ctrl-C (SIGINT) the same way and exit
  130 (128 + SIGINT); a second Ctrl-C stops at once. Lightning's own handling of Ctrl-C (a
  KeyboardInterrupt wherever it lands) keeps only the last epoch's checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from musicvae.training.checkpoint_io import nonfinite_entries
from musicvae.errors import NonFiniteError
from musicvae.training.lightning_private import request_graceful_stop

#: Exit status of a run stopped by SIGTERM after saving (128 + signal 15, as a shell reports it).
PREEMPTED_EXIT = 143
#: Exit status of a run stopped by Ctrl-C (128 + signal 2, as a shell reports it).
INTERRUPTED_EXIT = 130
#: Exit status of a run stopped by a NaN/Inf.
NONFINITE_EXIT = 3


def all_finite(parts: dict[str, torch.Tensor], module: Optional[torch.nn.Module] = None) -> bool:
    """True when every loss part and (with `module`) every gradient is finite.

    One device sync per step in the usual case: this runs on every step, and the names of what
    went wrong are only worked out when something did.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None] if module is not None else []
    # A 2-norm is NaN/Inf whenever an element is (and when huge finite values overflow it, which
    # the exact check below then clears); on a CPU it is much faster than the infinity norm
    # (docs/speed.md gives the figure and the command that measured it).
    if _finite(parts, grads, 2.0):
        return True
    return _finite(parts, grads, float("inf"))


def _finite(parts: dict[str, torch.Tensor], grads: list[torch.Tensor], norm: float) -> bool:
    checks = []
    if parts:
        checks.append(torch.isfinite(torch.stack([v.detach().float() for v in parts.values()])).all())
    if grads:
        # One total norm over every gradient (fused per device): finite exactly when each part is,
        # unless finite values overflow the 2-norm, which the infinity-norm retry settles.
        checks.append(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm, foreach=True)))
    if not checks:
        return True
    return bool(torch.stack([c.to(checks[0].device) for c in checks]).all())


def nonfinite_parts(parts: dict[str, torch.Tensor]) -> list[str]:
    """Names of the loss parts that are NaN or Inf (one device sync for all of them)."""
    if not parts:
        return []
    names = list(parts)
    finite = torch.stack([torch.isfinite(parts[n].detach().float()).all() for n in names]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def nonfinite_gradients(module: torch.nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or Inf."""
    named = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
    if not named:
        return []
    # Only on the way to an error message, so one check per parameter is cheap enough.
    finite = torch.stack([torch.isfinite(g).all() for _, g in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


class NonFiniteGuard(Callback):
    """Stops (or skips the batch) when a loss part or gradient is NaN/Inf, before the update.

    Args:
        skip: batches with a non-finite loss or gradient that may be skipped (their update
            dropped) before training stops; counted over the whole run, resumes included.
    """

    def __init__(self, skip: int = 0) -> None:
        if skip < 0:
            raise ValueError(f"skip_nonfinite must be >= 0, got {skip}")
        self.skip = skip
        self.skipped = 0
        self._batch: Any = None
        self._loss: Optional[torch.Tensor] = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch, self._loss = batch, None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()  # the loss about to be differentiated (one per optimizer under manual optimization)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        loss = {} if self._loss is None else {"loss": self._loss}
        # With fp16 mixed precision the GradScaler expects Inf gradients and skips those steps itself.
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        bad = not all_finite(loss, None if scaled else pl_module)
        if trainer.world_size > 1 and scaled:
            # Gradients are identical on every rank after DDP's all-reduce, losses are not:
            # every rank must take the same decision or the next collective hangs.
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        loss_parts = {**loss, **self._recomputed_parts(trainer, pl_module)} if nonfinite_parts(loss) else {}
        parts = nonfinite_parts(loss_parts)
        grads = [] if scaled else nonfinite_gradients(pl_module)
        what = _describe(parts, grads)
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.skipped < self.skip:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left alone
            rank_zero_warn(f"{where}: {what}; batch skipped ({self.skipped} of {self.skip} allowed by --skip_nonfinite)")
            return
        allowed = f" after skipping {self.skipped} batch(es)" if self.skip else ""
        raise NonFiniteError(
            f"training stopped at {where}{allowed}: {what}. No checkpoint was written for it; last.ckpt and "
            "best.ckpt hold the last finite weights. Try a lower --model.lr, --trainer.gradient_clip_val 1.0, "
            "check the data (bad values are reported when it is read), or allow a few bad batches with "
            "--skip_nonfinite N"
        )

    def _recomputed_parts(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The module's loss parts of this batch, recomputed to name the one that is not finite (only on
        the way to a message; the random state is left as it was)."""
        loss_parts = getattr(pl_module, "loss_parts", None)
        if loss_parts is None or self._batch is None:
            return {}
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), trainer.precision_plugin.forward_context():
            return {k: v.detach() for k, v in loss_parts(self._batch).items() if k != "loss"}


def _describe(parts: list[str], grads: list[str]) -> str:
    if parts:
        return f"loss part(s) {', '.join(parts)} non-finite (NaN or Inf)"
    listed = ", ".join(grads[:4]) + (" ..." if len(grads) > 4 else "")
    return f"gradient of {listed} non-finite (NaN or Inf) with finite loss parts on this process"


class Preemption(Callback):
    """On SIGTERM (and, with `interrupt`, a first Ctrl-C): after the current step, write
    `last.ckpt` if the weights are finite.

    Lightning raises SIGTERMException at the end of the step in which the signal arrived (on
    every rank under DDP); the command line turns it into exit status 143, or 130 after Ctrl-C
    (`stopped_by`). The handlers are this run's only: the previous ones come back when training
    ends, so a notebook or test process that called the command keeps its own.

    Args:
        checkpoint_dir: where `last.ckpt` goes.
        interrupt: also handle SIGINT (the command line does; the Python API keeps Python's
            KeyboardInterrupt).
        resume_command: the command that continues the run, printed on the way out.
    """

    def __init__(self, checkpoint_dir: Path, interrupt: bool = False, resume_command: Optional[str] = None) -> None:
        self.path = Path(checkpoint_dir) / "last.ckpt"
        self.interrupt = interrupt
        self.resume_command = resume_command or f"musicvae fit --ckpt_path {self.path}"
        self.saved = False
        self.requested = False
        self.stopped_by: Optional[int] = None  # the signal that asked for the stop
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Replaces Lightning's SIGTERM handler (registered just before the fit loop): it runs a
        # broadcast inside the handler, which deadlocks DDP ranks whose collectives it interleaves
        # (seen: 3 of 3 two-process runs hung). Ours only notes the signal; the ranks agree on it
        # after each batch, and Lightning's own checks then stop every rank at the same step.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT) if self.interrupt else (signal.SIGTERM,):
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            # The second Ctrl-C: stop now, as Python would have at the first.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.stopped_by = signum
            raise KeyboardInterrupt
        self.requested = True  # no collective, no I/O: safe wherever the signal lands
        self.stopped_by = self.stopped_by or signum
        if signum == signal.SIGINT:
            # os.write, not print: a handler may run inside another write to the same stream.
            os.write(2, b"\nmusicvae: Ctrl-C: finishing this step, then saving last.ckpt (Ctrl-C again stops at once)\n")

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # One scalar all-reduce per step under DDP (none on one device): a signal to any rank stops all.
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            request_graceful_stop(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, KeyboardInterrupt) and self.stopped_by == signal.SIGINT:
            rank_zero_info(f"musicvae: Ctrl-C twice: stopped at once at step {trainer.global_step}; {self.path} is the "
                           f"one last written. Continue with:\n  {self.resume_command}")
            return
        if not isinstance(exception, SIGTERMException):
            return
        exception.signal = self.stopped_by  # the command line's exit status: 130 after Ctrl-C, else 143
        step, name = trainer.global_step, "Ctrl-C" if self.stopped_by == signal.SIGINT else "SIGTERM"
        status = INTERRUPTED_EXIT if self.stopped_by == signal.SIGINT else PREEMPTED_EXIT
        bad = nonfinite_entries({"state_dict": pl_module.state_dict()})
        if bad:
            rank_zero_warn(f"{name} at step {step}: the weights hold NaN/Inf ({', '.join(bad[:3])}); no checkpoint written")
            return
        trainer.save_checkpoint(self.path)
        self.saved = True
        rank_zero_info(
            f"musicvae: {name}: saved {self.path} at step {step} (epoch {trainer.current_epoch}); exiting with "
            f"status {status}. Continue with:\n  {self.resume_command}"
        )
