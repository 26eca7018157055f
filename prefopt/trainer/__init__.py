"""The accelerate training loop and its step kinds. ``train(config)`` runs a recipe end to end."""

from prefopt.trainer.loop import TrainingDiverged, TrainResult, train

__all__ = ["train", "TrainResult", "TrainingDiverged"]
