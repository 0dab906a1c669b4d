"""Library behind the notebooks and jobs: config, models, tasks, data, FineTuner, launcher, evaluation.

Importing it has no side effects: nothing is downloaded, no device is chosen, no
environment variable is changed. (It only filters two misleading log lines, below.)
"""

import logging as _logging


class _KnownNoise(_logging.Filter):
    """Drops a library's log line that reads as an error but is not one."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def filter(self, record: _logging.LogRecord) -> bool:
        return self.marker not in record.getMessage()


# bitsandbytes, on every model load on a CPU: its CPU backend looks for an optional faster kernel package
# ("kernels") and falls back to its own code.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KnownNoise("from kernels-community"))
# liger-kernel, once per op and process on a GPU: optional backends (CuTe DSL, Ascend) that are not installed;
# its default Triton kernels run (seen four times per process in the 2-GPU logs of docs/BENCHMARKS.md).
_logging.getLogger("liger_kernel.backends.registry").addFilter(_KnownNoise("could not be imported"))
