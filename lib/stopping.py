"""Stop signals: a CML Job stopped by its user, or a worker preempted, gets SIGTERM. Training then
finishes its step, saves a checkpoint and ends, so the same command resumes from that step.

    stop = StopOnSignal()
    trainer.add_callback(stop)
    with stop.installed():
        trainer.train()
    if stop.stopped_at is not None:
        raise TrainingStopped(stop.signal_name, stop.stopped_at, checkpoint)

In a distributed run the ranks agree after every step (one all-reduce of one number), so they all
stop at the same step and save one checkpoint together, whichever of them got the signal. The number goes
through a CPU process group (gloo), never through the GPU: reading a GPU result back after every step
would make the CPU wait for the GPU's work of the whole step each time.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGTERM,)
EXIT_CODE = 128 + signal.SIGTERM  # 143: the shell's status for a process ended by SIGTERM


class TrainingStopped(RuntimeError):
    """Training ended early on a stop signal, after saving a checkpoint to resume from."""

    exit_code = EXIT_CODE

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"{signal_name} received: training stopped at step {step} after saving {checkpoint}; "
                         "run the same command again to resume from there")


class StopOnSignal(TrainerCallback):
    """Turns a stop signal into "save a checkpoint and stop" at the end of the current step."""

    def __init__(self):
        self.signal_name: str | None = None  # the signal this process received
        self.stopped_at: int | None = None   # the step training stopped after
        self._previous = {}
        self._group = None  # the CPU process group the ranks agree through

    @contextlib.contextmanager
    def installed(self):
        """Handle the stop signals while the block runs (only the main thread may set handlers: elsewhere
        the signals keep their default action)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._received) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}

    def _received(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            print(f"{self.signal_name} received: saving a checkpoint at the end of this step, then stopping",
                  file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank makes the group here, together; gloo's default group serves as it is
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def on_train_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if self._group is not None and dist.is_initialized():
            dist.destroy_process_group(self._group)
        self._group = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_asked(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
            self.signal_name = self.signal_name or "a stop signal (sent to another rank)"

    def _any_rank_asked(self, args) -> bool:
        asked = self.signal_name is not None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flag = torch.tensor([int(asked)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            asked = bool(flag.item())
        return asked
