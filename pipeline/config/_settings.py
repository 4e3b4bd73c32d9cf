"""Study-file sections about how a sweep runs rather than what it tunes: the speed caches and
the champion's selection. Validated like the rest of the study file (pipeline.config)."""

from __future__ import annotations

from pydantic import Field

from pipeline.config._schema import Bool, Frozen, Int


class CacheSection(Frozen):
    """Work a sweep does once instead of in every epoch of every trial (pipeline/imagecache.py,
    pipeline/features.py); each switch only changes speed, never the metrics beyond float rounding."""

    decoded_images: bool = Field(True, description="decode + resize each image file once per study")
    frozen_features: bool = Field(
        True,
        description="frozen stages run apart, without autograd, "
        "and their output is cached on val (and train at aug_strength 0)",
    )
    max_memory_mb: int | None = Field(
        None, ge=0, description="MiB of RAM for both caches together; null = a quarter of the machine's"
    )
    max_disk_mb: int | None = Field(
        None,
        ge=0,
        description="MiB of disk for decoded images under $SWEEP_HOME/cache/decoded (least recently used "
        "entries of earlier runs evicted); null = a quarter of the free space, at most 10 GiB; 0 = memory only",
    )


class BaselinesConfig(Frozen):
    linear_probe: Bool = True  # logistic regression on the frozen backbone's features, a candidate
    seed_recipe: Bool = True  # lr 0.001, momentum 0.9, freeze_depth 0, aug_strength 1: first trial


class SelectionSection(Frozen):
    """How the champion is chosen (pipeline.search): baselines take part, the `top_k`
    candidates by val are re-run with `reruns` further seeds and the best mean wins; `refit`
    retrains it on train + val before the one test evaluation. `reruns: 0` with both baselines
    off selects the best COMPLETE trial by value."""

    baselines: BaselinesConfig = BaselinesConfig()
    top_k: Int = Field(3, ge=1, description="candidates re-run with further seeds")
    reruns: Int = Field(2, ge=0, description="further seeds per candidate")
    # On by default: best mean champion test in the `selection` benchmark suite (README, "Choosing the champion")
    refit: Bool = True
