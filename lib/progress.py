"""Progress lines for training nobody watches live: a CML Job's log, a terminal's output sent to a file,
a notebook run headless by papermill. There the progress bar is a widget or carriage returns, so a log
shows nothing for minutes; this prints one plain line every PROGRESS_INTERVAL_S seconds instead:

    step 40/200 (20%) · loss 0.8123 · 2,310 tokens/s · elapsed 0:01:02 · remaining ~0:04:08

QLORA_PROGRESS: "lines" (always), "off" (never), "auto" (default: lines unless a live notebook or a
terminal shows a progress bar). jobs/run_notebook.py sets "lines" for the notebooks it runs.
QLORA_PROGRESS_INTERVAL_S: seconds between lines (default 30).
"""

from __future__ import annotations

import os
import sys
import time

from transformers import TrainerCallback

PROGRESS_VARIABLE, INTERVAL_VARIABLE = "QLORA_PROGRESS", "QLORA_PROGRESS_INTERVAL_S"
PROGRESS_INTERVAL_S = 30.0


def wanted() -> bool:
    """Whether this process should print progress lines (QLORA_PROGRESS, else what it runs in)."""
    mode = os.environ.get(PROGRESS_VARIABLE, "auto").strip().lower()
    if mode in ("lines", "on", "1"):
        return True
    if mode in ("off", "0"):
        return False
    return not _in_live_notebook() and not sys.stderr.isatty()


def _in_live_notebook() -> bool:
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and type(shell).__name__ == "ZMQInteractiveShell"


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_VARIABLE, PROGRESS_INTERVAL_S)))
    except ValueError:
        return PROGRESS_INTERVAL_S


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LogLastStep(TrainerCallback):
    """Logs the loss at the last step too: with logging_first_step every run of 2 steps or more then has at
    least 2 points on its loss curve, whatever logging_steps says (3 steps at logging_steps=5 gave one)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True


class ProgressLines(TrainerCallback):
    """Prints a progress line at the first step, then at most every `interval` seconds, and at the last step
    (main process only). Tokens/s is measured up to the last log: the trainer (lib.trainer) reads its token
    count back from the GPU only when it logs."""

    def __init__(self, interval: float | None = None, stream=None):
        self.interval = interval_s() if interval is None else interval
        self.stream = stream
        self.loss = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.printed_at, self.printed_last = time.monotonic(), None, False
        self.first_step, self.first_tokens = state.global_step, state.num_input_tokens_seen or 0
        self.logged_at, self.logged_tokens = self.started, self.first_tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
        self.logged_at, self.logged_tokens = time.monotonic(), state.num_input_tokens_seen or 0
        if state.global_step >= state.max_steps and not self.printed_last:
            self._print(state)  # the last step's line, after its log has counted every token
            self.printed_last = True

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if state.global_step >= state.max_steps or (
                self.printed_at is not None and now - self.printed_at < self.interval):
            return
        self._print(state)
        self.printed_at = now

    def _print(self, state) -> None:
        if not state.is_world_process_zero:
            return
        now = time.monotonic()
        elapsed = max(now - self.started, 1e-9)
        done = state.global_step - self.first_step
        remaining = (state.max_steps - state.global_step) * elapsed / done if done else 0.0
        counted = max(self.logged_at - self.started, 1e-9)
        tokens = self.logged_tokens - self.first_tokens
        speed = f"{tokens / counted:,.0f}" if tokens > 0 else "-"  # nothing counted before the first log
        loss = f"loss {self.loss:.4f}" if self.loss is not None else "loss -"
        print(f"step {state.global_step}/{state.max_steps} ({100 * state.global_step / max(state.max_steps, 1):.0f}%)"
              f" · {loss} · {speed} tokens/s · elapsed {clock(elapsed)} · remaining ~{clock(remaining)}",
              file=self.stream or sys.stdout, flush=True)
