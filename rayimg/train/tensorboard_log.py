"""TensorBoard event files of a training run (rank 0 only): scalars and validation images.

The writer is torch's ``torch.utils.tensorboard.SummaryWriter`` when the ``tensorboard`` package
is installed, else ``tensorboardX``'s (a rayimg dependency); both write the same event files.
Events go to ``<run_dir>/tensorboard/``: written there directly for a local run dir, or written
to a local folder and uploaded at each :meth:`TensorBoardLog.flush` for an ``s3://`` one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from rayimg.storage import Storage, is_s3, join, local_path

__all__ = ["TensorBoardLog", "summary_writer_class"]


def summary_writer_class(prefer: str | None = None):
    """``SummaryWriter`` from torch (needs ``tensorboard``) or tensorboardX; ``prefer`` picks one
    ("torch" or "tensorboardX") where both are installed."""
    if prefer in (None, "torch"):
        try:
            import tensorboard  # noqa: F401  torch's writer is a thin layer over it
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        except ImportError:
            if prefer == "torch":
                raise
    from tensorboardX import SummaryWriter

    return SummaryWriter


class TensorBoardLog:
    """Scalars and images of one run into ``<run_dir>/tensorboard/``."""

    def __init__(self, storage: Storage, run_dir: str, *, writer_class=None):
        self.storage, self.uri = storage, join(run_dir, "tensorboard")
        self._staging = None
        if is_s3(self.uri):
            self._staging = tempfile.TemporaryDirectory(prefix="rayimg-tensorboard-")
            logdir = Path(self._staging.name)
        else:
            logdir = local_path(self.uri)
            logdir.mkdir(parents=True, exist_ok=True)
        self.writer = (writer_class or summary_writer_class())(str(logdir), flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image under ``tag``."""
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        self._upload()

    def close(self) -> None:
        self.writer.close()
        self._upload()
        if self._staging is not None:
            self._staging.cleanup()

    def _upload(self) -> None:
        if self._staging is not None:
            for path in sorted(Path(self._staging.name).rglob("*")):
                if path.is_file():
                    self.storage.upload_file(path, join(self.uri, path.relative_to(self._staging.name).as_posix()))
