"""SIGINT / SIGTERM during training: finish the step, write a checkpoint, exit 128 + signal.

``PreemptionGuard`` (a context manager around a run) installs handlers that only set a flag. At
every step boundary the recipe calls ``agreed(device)``: on several ranks an all-reduce of the flag,
so every rank stops after the same step and the checkpoint's collectives match (a rank that stopped
alone would deadlock the others). The recipe then writes a checkpoint and raises
``pinfm_rec.errors.Preempted`` (exit code 130 for SIGINT, 143 for SIGTERM: what schedulers and
torchelastic read as "killed by a signal"); running the same command (or a ``--max-restarts``
restart) resumes from that checkpoint. A second signal stops at once, without a checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import torch

from pinfm_rec.errors import Preempted
from pinfm_rec.parallel import all_reduce_sum

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PreemptionGuard:
    def __init__(self) -> None:
        self.signum = 0
        self._pending_log = ""
        self._previous: dict = {}

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def _handler(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            raise Preempted(f"{name} received again: stopped at once, without a checkpoint", signum)
        self.signum = signum
        # Not ``logging`` here: the signal can land while the main thread is inside a logging call,
        # and a handler's write to the same buffered stream fails as a re-entrant call ("--- Logging
        # error ---" plus a traceback). os.write on the fd is unbuffered; the log file gets the
        # message at the next step boundary (``agreed``).
        try:
            os.write(2, f"pinfm: {name} received: finishing the current step, then writing a checkpoint "
                        f"(send it again to stop at once)\n".encode())
        except OSError:  # stderr closed: the flag is what matters
            pass
        self._pending_log = name

    def agreed(self, device: torch.device) -> int:
        """Collective at a step boundary: the signal any rank received (SIGTERM first), else 0."""
        if self._pending_log:
            logger.info("%s received: finishing the current step, then writing a checkpoint", self._pending_log)
            self._pending_log = ""
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return self.signum
        flags = torch.tensor([self.signum == signal.SIGINT, self.signum == signal.SIGTERM],
                             dtype=torch.float32, device=device)
        flags = all_reduce_sum(flags).tolist()
        return int(signal.SIGTERM) if flags[1] else int(signal.SIGINT) if flags[0] else 0


def preempted(signum: int, step: int, checkpoint: str) -> Preempted:
    name = signal.Signals(signum).name
    return Preempted(f"{name} received: stopped after step {step}, checkpoint {checkpoint} written; "
                     f"run the same command to resume", signum)
