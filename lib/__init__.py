"""Library behind the notebooks and jobs: config, models, tasks, data, FineTuner, launcher, evaluation.

Importing it has no side effects: nothing is downloaded, no device is chosen, no
environment variable is changed. (It only filters one misleading bitsandbytes log line, below.)
"""

import logging as _logging


class _KnownNoise(_logging.Filter):
    """Drops a bitsandbytes warning printed on every model load that reads as an error but is not one: its
    CPU backend looks for an optional faster kernel package ("kernels") and falls back to its own code."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "from kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KnownNoise())
