"""--tensorboard DIR: the numbers of metrics.jsonl as TensorBoard scalars (torch.utils.tensorboard).

Optional: needs the `tensorboard` package. Each numeric field of a step's record becomes a scalar of the
same name at that step. A resumed run opens the writer with purge_step = its first step, so TensorBoard
hides the events a killed run wrote after its last checkpoint, as metrics.jsonl drops those lines.
"""

from __future__ import annotations

import math

from rwkvslice.errors import ConfigError


def check_available() -> None:
    """ConfigError (one line) when torch.utils.tensorboard cannot be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {exc}"
                          .splitlines()[0]) from None


class TensorBoardLog:
    def __init__(self, log_dir: str, first_step: int = 1):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, purge_step=first_step if first_step > 1 else None)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
