"""Training and evaluation of the LM: one loop for notebooks (:func:`train`) and the CLI (``labcore train``).

==============  ==============================================================================
module          what it holds
==============  ==============================================================================
config          :class:`TrainConfig`, every setting of a run besides the model and the data
schedule        :func:`lr_at` (warmup + cosine), the memory-value LR factor, :func:`set_step_lr`
optimizer       :func:`build_optimizer`: AdamW over the role-tagged parameter groups
device          device and bf16-autocast choice, seeding, RNG states for checkpoints
metrics         :func:`sparse_metrics`: coverage / balance / stats of the sparse layers' aux records
evaluation      :func:`evaluate`: validation loss, perplexity, recall, sparse metrics
history         ``history.jsonl`` writer (flushed per row, truncated on resume)
checkpoints     ``checkpoints/step-*.pt``: atomic save, latest, resume identity
loop            :func:`train` (one optimiser step, resume, NaN stop), :class:`TrainResult`
run_config      the YAML run file (sections model, plan, data, train) -> validated configs
cli             ``labcore train CONFIG.yaml --out DIR`` (also ``python -m labcore.lm.train``)
==============  ==============================================================================

Precision: on CUDA the forward runs under bf16 autocast (parameters and optimiser state stay
fp32); on CPU everything is fp32. ``dtype`` overrides ("fp32" or "bf16").
"""

from labcore.lm.train.checkpoints import latest_checkpoint
from labcore.lm.train.cli import cli_main
from labcore.lm.train.config import TrainConfig
from labcore.lm.train.device import autocast_dtype, resolve_device
from labcore.lm.train.evaluation import evaluate
from labcore.lm.train.loop import Callback, NonFiniteLossError, TrainResult, train
from labcore.lm.train.metrics import sparse_metrics
from labcore.lm.train.optimizer import build_optimizer
from labcore.lm.train.run_config import load_run_config
from labcore.lm.train.schedule import lr_at, set_step_lr, value_lr_schedule

__all__ = ["Callback", "NonFiniteLossError", "TrainConfig", "TrainResult", "autocast_dtype", "build_optimizer",
           "cli_main", "evaluate", "latest_checkpoint", "load_run_config", "lr_at", "resolve_device",
           "set_step_lr", "sparse_metrics", "train", "value_lr_schedule"]
