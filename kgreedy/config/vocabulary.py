"""The words of kgreedy's recipes and exports: every closed set of choices, in one
TF-free module that the config, the model and the front ends all import (so a choice
is spelled once)."""

import re

SOURCES = ("digits", "tfds", "image_folder")
AUGMENTS = ("none", "cifar", "imagenet")
DOWNSAMPLES = ("none", "psi", "maxpool", "avgpool", "stride")
HEAD_TYPES = ("conv", "mlp_sr", "linear", "vgg")
# The last stage may also keep the model's own classifier (split models only).
LAST_HEAD_TYPES = HEAD_TYPES + ("model",)
OPTIMIZERS = ("sgd", "adamw")
WEIGHT_DECAY_TYPES = ("l2", "decoupled")
SCHEDULES = ("constant", "step", "cosine")
MODES = ("greedy", "end_to_end", "decoupled")
# Modes that train every module in one stage (stage J), one schedule for all.
ONE_STAGE_MODES = ("end_to_end", "decoupled")
CACHE_MODES = ("auto", "on", "off")
# What a module trains on (aux.objective): kgreedy.model.objectives.OBJECTIVES.
LOCAL_OBJECTIVES = ("cross_entropy", "infopro", "infopro_contrast")
IMAGE_CACHES = ("auto", "memory", "disk", "none")
BAD_FILES = ("skip", "error")
# auto: bfloat16 where the hardware has it natively (kgreedy/training/precision.py).
PRECISIONS = ("none", "mixed_bfloat16", "mixed_float16", "auto")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
EXPORT_HEADS = ("last", "ensemble", "early_exit")  # what an export serves: the last head, or all
TUNERS = ("random", "hyperband", "bayesian")
SCOPES = ("joint", "per_stage")
OBJECTIVES = {"val_accuracy": "max", "val_loss": "min"}  # tuner objective: direction
# Recipe, model and search names; match with fullmatch (`$` would also accept a
# trailing newline: `\Z` keeps even a stray `match` right).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
