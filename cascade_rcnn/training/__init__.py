"""Training: config (`config`), the loop (`trainer`), checkpoints (`checkpoint`), distributed helpers
(`distributed`), initial weights (`initialization`), lr schedule (`schedule`), data wiring (`data`) and evaluation
during training (`validation`)."""

from cascade_rcnn.training.config import DataConfig, ExperimentConfig, TrainConfig, load_experiment
from cascade_rcnn.training.trainer import NonFiniteLossError, Trainer, TrainingInterrupted, TrainResult

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "load_experiment",
]
