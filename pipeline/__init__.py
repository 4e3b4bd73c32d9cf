"""sweep: Optuna studies over fine-tuning pretrained image classifiers, tracked in MLflow."""

__version__ = "0.1.0"
