"""Pure training: `train_one_epoch`/`evaluate`/`fit` return frozen results and never log;
`fit_config` sets up one fit (threads, caches, memory layout) for a trial or a refit; the cached
features of frozen stages; the linear probe on the frozen backbone.
"""

from pipeline.training._fitting import fit_config
from pipeline.training._machine import configure_threads, cpu_cores
from pipeline.training._preflight import Prepared, Source, prepare
from pipeline.training._probe import fit_linear_probe, probe_loaders
from pipeline.training._refit import refit_probe, refit_trial
from pipeline.training._train import EpochResult, FitResult, NonFiniteLossError, evaluate, pick_device

__all__ = [
    "EpochResult",
    "FitResult",
    "NonFiniteLossError",
    "Prepared",
    "Source",
    "configure_threads",
    "cpu_cores",
    "evaluate",
    "fit_config",
    "fit_linear_probe",
    "pick_device",
    "prepare",
    "probe_loaders",
    "refit_probe",
    "refit_trial",
]
