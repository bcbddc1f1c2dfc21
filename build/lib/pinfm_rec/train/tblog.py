"""TensorBoard logging (rank 0 writes; other ranks get a no-op logger)."""
from __future__ import annotations

import os
from typing import Dict, Optional

from torch.utils.tensorboard import SummaryWriter


class TBLogger:
    """Scalars and text under ``<run_dir>/tb``; resumed runs append to the same directory.

    purge_step: a resumed run's step: TensorBoard drops the events earlier files logged at steps
    >= it (those of the interrupted attempt after its checkpoint), so no step has two points.
    """

    def __init__(self, run_dir: str, enabled: bool = True, purge_step: Optional[int] = None) -> None:
        self.writer: Optional[SummaryWriter] = None
        if enabled:
            os.makedirs(os.path.join(run_dir, "tb"), exist_ok=True)
            self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tb"), purge_step=purge_step)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, float(v), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # Markdown code block keeps YAML indentation readable in TensorBoard's text tab.
            self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
