"""One keras-tuner search over the auxiliary design: the `HyperModel` whose `fit`
trains with kgreedy's own `StageLoop` and `EpochDriver`, and the tuners that report
each trial (`kgreedy.tune`).

keras-tuner's contract, kept here: `build` returns a Keras model (the deployed model
of the trial's network, whose weights the tuner saves at the best epoch and Hyperband
reloads to continue a trial); `fit` accepts the tuner's keyword arguments, calls its
callbacks (`set_model`, `on_epoch_end`) and returns the metrics; an invalid design
raises `FailedTrialError` (the trial fails, the search goes on); a configuration
mistake or a full disk raises a `FatalError` (the search stops).
"""

import os
import time

import keras
import keras_tuner
from keras_tuner.errors import FailedTrialError, FatalError

from kgreedy.base import faults
from kgreedy.base.errors import DiskFull, KgreedyError
from kgreedy.base.files import write_json
from kgreedy.config.vocabulary import OBJECTIVES
from kgreedy.model.from_recipe import from_recipe
from kgreedy.model.network import count_params, parameter_table
from kgreedy.training import precision
from kgreedy.training.cache import FeatureCache, use_cache
from kgreedy.training.actions import Action
from kgreedy.training.driver import EpochDriver, LiveSteps
from kgreedy.training.stage import StageLoop
from kgreedy.tuning.space import (candidate_recipe, declare, design_from, objective_from,
                                  pool_problem, searched_values, stage_sides, trial_recipe)

TRIAL_INFO = "kgreedy.json"  # in each trial directory: what tuning.json reports


class ConfigError(FatalError):
    """A configuration mistake found inside a trial: stops the search (exit status 2).

    Attributes:
        error: the `KgreedyError`.
    """

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class Search:
    """One keras-tuner search: the stage it scores and what is fixed before it.

    Args:
        tune: the `TuneRecipe`.
        datasets: `kgreedy.data.Datasets` of the base recipe.
        strategy: the `tf.distribute.Strategy` trials train under.
        progress: a `Progress`.
        work_dir: where feature caches that do not fit in memory go.
        stage: joint: N, the last stage trained; per_stage: the stage searched.
        fixed: per_stage: the `HeadDesign`s chosen for stages 1..stage-1.
        learning_rate: per_stage after stage 1: the rate chosen with stage 1.
        local_objective: per_stage after stage 1: the (aux.objective,
            aux.objective_weights) chosen with stage 1
            (`kgreedy.tuning.space.objective_from`).
        trunk_net: per_stage after stage 1: the best network of the stage before
            (its modules 1..stage-1 are the trained trunk).
        sides: `kgreedy.tuning.space.stage_sides` of the base recipe's trunk
            (default: computed here, which builds a split model once).
    """

    def __init__(self, tune, datasets, strategy, progress, work_dir, stage, fixed=(),
                 learning_rate=None, trunk_net=None, sides=None, local_objective=None):
        self.tune = tune
        self.datasets = datasets
        self.strategy = strategy
        self.progress = progress
        self.work_dir = work_dir
        self.stage = stage
        self.fixed = list(fixed)
        self.learning_rate = learning_rate
        self.local_objective = local_objective
        self.trunk_net = trunk_net
        self.trunk = (None if trunk_net is None else
                      [m.get_weights() for m in trunk_net.modules[:stage - 1]])
        spec = datasets.spec
        self.sides = sides or stage_sides(tune.base, spec.image_shape, spec.num_classes)
        self.cache = None  # per_stage: the trunk's features, shared by every trial
        self.name = "joint" if tune.scope == "joint" else f"stage{stage}"

    def cache_for(self, net, stage, recipe):
        """The frozen-prefix feature cache stage `stage` of `net` trains on, or None.

        per_stage: the fixed trunk's features, built at the first trial that needs
        them and shared by the others (`remove_cache` frees them); joint: the trial's
        own, which the caller removes after the stage.
        """
        if stage < 2 or not use_cache(recipe.train, self.datasets, stage, 1, net):
            return None
        if self.trunk_net is None:
            return FeatureCache(net, stage, self.datasets,
                                os.path.join(self.work_dir, "cache", self.name),
                                recipe.train.cache_memory_mb).build()
        if self.cache is None:
            self.cache = FeatureCache(self.trunk_net, stage, self.datasets,
                                      os.path.join(self.work_dir, "cache", self.name),
                                      recipe.train.cache_memory_mb).build()
        return self.cache

    def remove_cache(self):
        if self.cache is not None:
            self.cache.remove()
            self.cache = None

    def checked_stages(self):
        """Stages whose pooling a trial's design must fit: joint, every stage (the
        final recipe gives the design to all); per_stage, the searched stage."""
        if self.tune.scope == "joint":
            return 1, self.tune.base.num_stages
        return self.stage, self.stage

    def train_stage(self, net, stage, recipe, start, end, cache, on_epoch):
        """Trains `stage` of `net` from epoch `start` to `end` with a fresh `StageLoop`
        and the epoch driver the trainer uses, calling `on_epoch(stage, epoch, logs)`
        after each epoch's evaluation."""
        steps = self.datasets.stage_steps(recipe.train)
        loop = StageLoop(net, stage, recipe.train, self.strategy, steps,
                         cached_features=cache is not None)
        rate = recipe.train.optimizer.learning_rate
        driver = EpochDriver(
            loop, self.datasets, recipe.train.epochs_per_stage,
            self.datasets.distributed_eval(self.strategy,
                                           None if cache is None else cache.eval_split),
            train_source=None if cache is None else cache.train_split,
            actions=[LiveSteps(self.progress, last_epoch=end), _TunerEpochs(on_epoch)],
            nonfinite=lambda epoch, step: FailedTrialError(
                f"stage {stage}, epoch {epoch}: the loss is not finite (learning rate "
                f"{rate:.4g} too high?)"))
        if start:  # a continued trial: its schedule goes on where it stopped
            driver.start_at(start + 1)
        driver.run(end)


class _TunerEpochs(Action):
    """Hands each epoch's figures to the trial, in keras-tuner's metric names."""

    def __init__(self, on_epoch):
        self.on_epoch = on_epoch

    def after_epoch(self, driver, record):
        self.on_epoch(record["stage"], record["epoch"],
                      {"loss": record["train_loss"], "accuracy": record["train_accuracy"],
                       "val_loss": record["val_loss"],
                       "val_accuracy": record["val_accuracy"]})


class AuxHyperModel(keras_tuner.HyperModel):
    """Builds a trial's network from its hyperparameters and trains it with `StageLoop`.

    Args:
        search: the `Search`.
    """

    def __init__(self, search):
        super().__init__(name=search.name)
        self.search = search
        self.built_last = None  # (model, net, recipe, problem) of the last build
        self.report = {}        # what the running trial reports to tuning.json

    def declare_hyperparameters(self, hp):
        declare(hp, self.search.tune, self.search.stage)

    def build(self, hp):
        s = self.search
        tune, spec = s.tune, s.datasets.spec
        declare(hp, tune, s.stage)
        # keras-tuner clears the Keras session before every build, policy included.
        keras.mixed_precision.set_global_policy(
            precision.policy_name(tune.base.train.mixed_precision))
        keras.utils.set_random_seed(tune.base.seed)
        design = design_from(hp.values, tune)
        lr = hp.values.get("learning_rate", s.learning_rate)
        local = s.local_objective or objective_from(hp.values, tune)
        candidate = candidate_recipe(tune, [*s.fixed, design], lr, local_objective=local)
        recipe = trial_recipe(tune, candidate, s.stage)
        problem = pool_problem(candidate, s.sides, *s.checked_stages())
        if problem and tune.scope == "joint":
            problem += " (the best recipe gives the design to every stage)"
        self.report.update(design=design.to_dict(),  # tuning.json's form
                           learning_rate=recipe.train.optimizer.learning_rate,
                           aux_objective=local[0], objective_weights=local[1])
        if problem:  # fit fails the trial; build must not (keras-tuner builds at start)
            model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
            self.built_last = (model, None, recipe, problem)
            return model
        with s.strategy.scope():
            net = from_recipe(recipe, spec.image_shape, spec.num_classes, spec.mean,
                              spec.std, stages=s.stage)
            for module, weights in zip(net.modules, s.trunk or ()):
                module.set_weights(weights)
            model = net.deployed_model(s.stage)
        row = parameter_table(net)[s.stage - 1]
        self.report.update(trainable_params=row["trainable_params"],
                           deployed_params=row["deployed_params"],
                           head_params=count_params(net.heads[s.stage - 1].trainable_weights))
        self.built_last = (model, net, recipe, None)
        return model

    def fit(self, hp, model, *args, callbacks=None, epochs=None, initial_epoch=0, **kwargs):
        """Trains the trial; returns the metrics of stage N's best epoch.

        Hyperband passes `epochs` (stage N trains up to it) and `initial_epoch` (the
        weights of a previous trial were loaded: stages before N are done and stage N
        continues at that epoch, its learning-rate schedule too; the optimizer's
        momentum starts afresh).
        """
        del hp, args, kwargs
        if self.built_last is None or self.built_last[0] is not model:
            raise FatalError("HyperModel.fit got a model that build() did not make")
        _, net, recipe, problem = self.built_last
        try:
            if problem:
                raise FailedTrialError(problem)
            return self._fit(model, net, recipe, list(callbacks or ()),
                             epochs or recipe.train.epochs_per_stage, initial_epoch)
        except KgreedyError as e:
            self.report["message"] = str(e)
            raise ConfigError(e) from e
        except Exception as e:
            if isinstance(faults.classify(e), DiskFull):
                # Every trial after it would fail the same way: stop the search, and
                # kgreedy.cli names the disk (exit status 74); a rerun resumes.
                raise FatalError(f"the disk is full: {e}") from e
            # An unexpected error fails the trial too (keras-tuner's rule); its
            # traceback is in the trial's trial.json.
            self.report["message"] = str(e) if isinstance(e, FailedTrialError) \
                else f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
            raise

    def _fit(self, model, net, recipe, callbacks, last_epoch, initial_epoch):
        s = self.search
        objective, direction = s.tune.objective, OBJECTIVES[s.tune.objective]
        for callback in callbacks:
            callback.set_model(model)
        best = {}

        def on_epoch(stage, epoch, logs):
            if stage != s.stage:
                return
            for callback in callbacks:
                callback.on_epoch_end(epoch - 1, logs)
            old = best.get(objective)
            if old is None or (logs[objective] > old if direction == "max"
                               else logs[objective] < old):
                best.clear()
                best.update(logs)

        first = 1 if s.tune.scope == "joint" else s.stage
        for stage in range(first, s.stage + 1):
            if stage < s.stage and initial_epoch:
                continue  # a continued Hyperband trial: loaded with its weights
            start = initial_epoch if stage == s.stage else 0
            end = last_epoch if stage == s.stage else recipe.train.epochs_per_stage
            cache = s.cache_for(net, stage, recipe)
            try:
                s.train_stage(net, stage, recipe, start, end, cache, on_epoch)
            finally:
                if cache is not None and cache is not s.cache:
                    cache.remove()
        self.report.update(metrics=dict(best), epochs=last_epoch - initial_epoch)
        return dict(best)


class _Reporting:
    """Mixed into keras-tuner's tuners: times each trial, writes its `kgreedy.json`
    (design, metrics, parameters, seconds, failure message) and prints one line."""

    def on_trial_begin(self, trial):
        self.hypermodel.report = {"started": time.perf_counter()}
        super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        report = self.hypermodel.report
        report["seconds"] = round(time.perf_counter() - report.pop("started"), 3)
        write_json(os.path.join(self.get_trial_dir(trial.trial_id), TRIAL_INFO), report)
        try:
            super().on_trial_end(trial)  # the oracle scores the trial
        finally:
            search, values = self.hypermodel.search, trial.hyperparameters.values
            shown = " ".join(f"{k}={fmt(v)}" for k, v in searched_values(values).items())
            if values.get("tuner/trial_id") is not None:
                shown += (f" (continues trial {values['tuner/trial_id']} from epoch "
                          f"{values['tuner/initial_epoch']})")
            if trial.status == "COMPLETED":
                outcome = (f"{search.tune.objective} {fmt(trial.score)} "
                           f"({report.get('epochs')} epochs, {report['seconds']:.1f}s)")
            else:
                outcome = f"failed: {report.get('message', 'see trial.json')}"
            search.progress.message(f"{search.name} trial {trial.trial_id}: {shown} "
                                    f"-> {outcome}")


def fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_TUNERS = {"random": keras_tuner.RandomSearch, "hyperband": keras_tuner.Hyperband,
           "bayesian": keras_tuner.BayesianOptimization}


def make_tuner(search, directory):
    """The keras-tuner tuner of a search; its project is `directory/<search name>` and
    is reloaded when it exists (overwrite=False), so finished trials are not rerun."""
    tune = search.tune
    base_cls = _TUNERS[tune.tuner]
    cls = type(f"Kgreedy{base_cls.__name__}", (_Reporting, base_cls), {})
    kwargs = dict(
        hypermodel=AuxHyperModel(search),
        objective=keras_tuner.Objective(tune.objective, OBJECTIVES[tune.objective]),
        # keras-tuner draws a random seed for a seed of 0.
        seed=(tune.base.seed if tune.seed is None else tune.seed) + 1,
        max_consecutive_failed_trials=tune.max_consecutive_failed_trials or 2 ** 62,
        distribution_strategy=search.strategy, directory=directory,
        project_name=search.name, overwrite=False)
    if tune.tuner == "hyperband":
        return cls(max_epochs=tune.epochs_per_trial, factor=tune.hyperband_factor, **kwargs)
    return cls(max_trials=tune.max_trials, **kwargs)


def best_net(tuner):
    """The best trial's `GreedyNet`, with its weights at its best epoch."""
    best = tuner.oracle.get_best_trials(1)[0]
    model = tuner.load_model(best)
    built_model, net = tuner.hypermodel.built_last[:2]
    if built_model is not model or net is None:
        raise FatalError(f"could not rebuild the network of trial {best.trial_id}")
    return net


def quiet_trial_tracebacks():
    """Stops keras-tuner printing the traceback of every failed trial: kgreedy prints
    one line per trial, and the trial's trial.json keeps the traceback.

    keras-tuner 1.4 has no public switch for this, only the module flag
    `keras_tuner.src.config.DEBUG`; it is set here, in this one place, and a
    keras-tuner without it merely prints the tracebacks.
    """
    try:
        from keras_tuner.src import config
    except ImportError:
        return
    config.DEBUG = False
