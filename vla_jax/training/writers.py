"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files, Weights & Biases (optional) and a
tqdm progress bar. Only process 0 writes; the others get a writer that does nothing."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Mapping, Optional

log = logging.getLogger(__name__)

BAR_FIELDS = (("loss", "loss", "{:.4f}"), ("action_accuracy", "acc", "{:.3f}"), ("l1_loss", "l1", "{:.3f}"))


class MetricWriter:
    """write(record) appends one JSON line (and TB/W&B scalars); progress(record) updates the bar.

    tensorboard: write event files to WORKDIR/tensorboard (imports TensorFlow's tf.summary).
    wandb: a dict of wandb.init kwargs (project, name, ...) or None; used only if wandb is installed.
    """

    def __init__(self, workdir: str, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, wandb: Optional[Mapping[str, Any]] = None,
                 progress: bool = True, run_config: Optional[Dict[str, Any]] = None):
        self.enabled = enabled
        self._tb = self._wandb = self._bar = self._file = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            # tf.summary.scalar lives in the tensorboard package (not installed with tensorflow-cpu);
            # the raw tf.summary.write with the scalars plugin's metadata writes the same events.
            self._tf = tf
            self._tb_meta = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
                data_class=summary_pb2.DATA_CLASS_SCALAR)
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                log.warning("config.log.wandb is set but wandb is not installed; not logging to W&B")
            else:
                self._wandb = wandb_lib.init(config=run_config, **dict(wandb))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             smoothing=0.1, desc="train")

    def write(self, record: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(dict(record)) + "\n")
        self._file.flush()
        step = int(record["step"])
        if self._tb is not None:
            with self._tb.as_default(step=step):
                for k, v in record.items():
                    if k != "step":
                        self._tf.summary.write(k, self._tf.constant(float(v), self._tf.float32), step=step,
                                               metadata=self._tb_meta)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def progress(self, record: Mapping[str, float], steps: int = 1) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(" ".join(f"{short}={fmt.format(record[k])}" for k, short, fmt in BAR_FIELDS
                                           if k in record), refresh=False)
        self._bar.update(steps)

    def message(self, text: str) -> None:
        """A line that does not break the progress bar (process 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._wandb = self._bar = self._file = None
