"""The searches of a tune recipe, one after another, and what they leave behind.

`AuxTuning` runs one keras-tuner search (scope `joint`), or one per stage on top of
the best trunk of the stage before (scope `per_stage`); each trial trains with
kgreedy's own epoch driver (`kgreedy.tuning.search`). Results go to the output
directory: `tune_recipe.json`, `tuner/` (keras-tuner projects: rerunning resumes
them), `tuning.json` (trials by score) and `best_recipe.json` (a complete train
recipe).

A trial's design is a `kgreedy.config.designs.HeadDesign` (`design_from`);
tuning.json, each trial's kgreedy.json and the context of a per_stage search hold
it as `HeadDesign.to_dict` writes it, and the best designs are read back with
`HeadDesign.from_dict` before they build the next search and the best recipe.
"""

import os

from kgreedy.base.errors import SearchFailed
from kgreedy.base.files import read_json, write_json
from kgreedy.base.progress import Progress
from kgreedy.config.designs import HeadDesign
from kgreedy.config.recipe import ObjectiveWeightsConfig, recipe_from_dict
from kgreedy.config.schema import to_plain
from kgreedy.config.vocabulary import OBJECTIVES
from kgreedy.tuning.search import TRIAL_INFO, Search, best_net, fmt, make_tuner
from kgreedy.tuning.space import (candidate_recipe, encode_weights, objective_from,
                                  searched_values)

TUNE_RECIPE, TUNING, BEST_RECIPE = "tune_recipe.json", "tuning.json", "best_recipe.json"
CONTEXT = "kgreedy_context.json"  # in a search's project: what the search builds on


class AuxTuning:
    """Runs the searches of a tune recipe and writes the results.

    Args:
        tune: a validated `TuneRecipe`.
        datasets: `kgreedy.data.Datasets` of the base recipe.
        strategy: the base recipe's `tf.distribute.Strategy`.
        output: the output directory (it exists).
        progress: a `Progress`.
        sides: `kgreedy.tuning.space.stage_sides` of the base recipe's trunk
            (default: computed at the first search).
    """

    def __init__(self, tune, datasets, strategy, output, progress=None, sides=None):
        self.tune = tune
        self.datasets = datasets
        self.strategy = strategy
        self.output = output
        self.progress = progress or Progress()
        self.sides = sides
        self.searches = []  # (search, tuner), in order

    def path(self, *parts):
        return os.path.join(self.output, *parts)

    def run(self):
        """Runs (or resumes) every search; returns the tuning.json dict."""
        tune = self.tune
        if tune.scope == "joint":
            best = self._search(tune.num_stages, context={})
            designs = [HeadDesign.from_dict(best["design"])]
            lr, local = best["learning_rate"], self._local(best)
        else:
            designs, lr, local, trunk_net, context = [], None, None, None, {}
            for stage in range(1, tune.num_stages + 1):
                best = self._search(stage, context, designs, lr, trunk_net, local)
                designs.append(HeadDesign.from_dict(best["design"]))
                lr = best["learning_rate"] if lr is None else lr
                local = local or self._local(best)
                # What the next search builds on: this search and its best trial.
                context = {"after": context, "stage": stage, "best_trial": best["trial_id"],
                           "designs": [d.to_dict() for d in designs],
                           "learning_rate": lr,
                           "aux_objective": local[0], "objective_weights": local[1]}
                if stage < tune.num_stages:
                    trunk_net = best_net(self.searches[-1][1])
        recipe = candidate_recipe(tune, designs, lr, name=f"{tune.name}_best",
                                  local_objective=local)
        recipe = recipe_from_dict(dict(recipe.to_dict(),
                                       description=self._describe(designs, local)))
        write_json(self.path(BEST_RECIPE), recipe.to_dict())
        return self._write_results(best_recipe=BEST_RECIPE)

    def _search(self, stage, context, designs=(), learning_rate=None, trunk_net=None,
                local_objective=None):
        """Runs one search (per_stage: on top of `trunk_net`); returns its best row.

        `context` says what the search builds on. A resumed per_stage search whose
        earlier stages now have another best trial (more trials were allowed) is stale:
        it is moved aside and searched again.
        """
        search = Search(self.tune, self.datasets, self.strategy, self.progress, self.output,
                        stage, designs, learning_rate, trunk_net, self.sides, local_objective)
        self.sides = search.sides
        self._check_context(search.name, context)
        tuner = make_tuner(search, self.path("tuner"))
        self.searches.append((search, tuner))
        done = sum(t.status in ("COMPLETED", "FAILED") for t in tuner.oracle.trials.values())
        self.progress.message(f"search {search.name}: {self.tune.tuner}"
                              + (f", {done} trials done before" if done else ""))
        try:
            tuner.search(verbose=0)
        except RuntimeError as e:
            if "consecutive failures" not in str(e):
                raise
            self._write_results()
            raise SearchFailed(f"search {search.name} stopped: {str(e).splitlines()[0]}; "
                               f"see {self.path(TUNING)}") from None
        finally:
            search.remove_cache()
        best = tuner.oracle.get_best_trials(1)
        if not best or best[0].status != "COMPLETED":
            self._write_results()
            raise SearchFailed(f"search {search.name}: no trial completed (every design "
                               f"failed); see {self.path(TUNING)}")
        # keras-tuner's best (ties: the earlier trial), whose weights best_net loads.
        return next(r for r in self._rows(search, tuner) if r["trial_id"] == best[0].trial_id)

    def _check_context(self, name, context):
        project = self.path("tuner", name)
        saved_path = os.path.join(project, CONTEXT)
        if os.path.isdir(project) and os.listdir(project):
            saved = read_json(saved_path) if os.path.isfile(saved_path) else None
            if saved == to_plain(context):  # as it reads back from JSON
                return
            n = 1
            while os.path.exists(f"{project}.superseded-{n}"):
                n += 1
            os.replace(project, f"{project}.superseded-{n}")
            self.progress.warning(f"search {name}: the best design or trunk of the stages "
                                  f"before it changed; its trials are moved to "
                                  f"{project}.superseded-{n} and it is searched again")
        os.makedirs(project, exist_ok=True)
        write_json(saved_path, context)

    # ------------------------------------------------------------ results ----

    def _rows(self, search, tuner):
        direction = OBJECTIVES[self.tune.objective]
        rows = []
        for trial in tuner.oracle.trials.values():
            info_path = os.path.join(tuner.get_trial_dir(trial.trial_id), TRIAL_INFO)
            info = read_json(info_path) if os.path.isfile(info_path) else {}
            completed = trial.status == "COMPLETED"
            rows.append({
                "search": search.name, "stage": search.stage, "trial_id": trial.trial_id,
                "status": trial.status, "score": trial.score if completed else None,
                "hyperparameters": searched_values(trial.hyperparameters.values),
                "continues": trial.hyperparameters.values.get("tuner/trial_id"),
                "design": info.get("design"), "learning_rate": info.get("learning_rate"),
                "aux_objective": info.get("aux_objective"),
                "objective_weights": info.get("objective_weights"),
                "metrics": info.get("metrics"), "epochs": info.get("epochs"),
                "trainable_params": info.get("trainable_params"),
                "deployed_params": info.get("deployed_params"),
                "head_params": info.get("head_params"), "seconds": info.get("seconds"),
                "message": None if completed else info.get("message", trial.message)})
        sign = -1 if direction == "max" else 1
        rows.sort(key=lambda r: (r["score"] is None,
                                 0 if r["score"] is None else sign * r["score"],
                                 len(r["trial_id"]), r["trial_id"]))  # ties: earlier first
        return rows

    def _write_results(self, best_recipe=None):
        tune = self.tune
        rows = [r for search, tuner in self.searches for r in self._rows(search, tuner)]
        best = []
        for search, tuner in self.searches:
            top = tuner.oracle.get_best_trials(1)
            for r in rows:
                if top and top[0].status == "COMPLETED" and r["search"] == search.name \
                        and r["trial_id"] == top[0].trial_id:
                    best.append({k: r[k] for k in ("search", "stage", "trial_id", "score",
                                                   "design", "learning_rate",
                                                   "aux_objective", "objective_weights")})
        results = {"name": tune.name, "tuner": tune.tuner, "scope": tune.scope,
                   "objective": tune.objective, "direction": OBJECTIVES[tune.objective],
                   "stages": tune.num_stages, "best": best,
                   "best_recipe": best_recipe and self.path(best_recipe), "trials": rows}
        write_json(self.path(TUNING), results)
        self._print_table(rows)
        return results

    def _print_table(self, rows):
        show = self.progress.message
        # The objective columns only where trials can differ in it or it is not the
        # paper's: a search of heads alone prints the table it always did.
        space, aux = self.tune.search, self.tune.base.aux
        local = (space.aux_objective is not None or space.objective_weights is not None
                 or aux.objective != "cross_entropy")
        wide = max([len("weights")] + [len(_shown_weights(r)) for r in rows])
        show(f"{'search':<8} {'trial':>5}  {'status':<9} {self.tune.objective:>12}  "
             f"{'head':<6} {'k':>2} {'width':>5} {'pool':>4} {'lr':>8} "
             + (f"{'aux.objective':<16} {'weights':<{wide}} " if local else "")
             + f"{'params':>10} {'seconds':>8}")
        for r in rows:
            head, k, width, pool = _shown_design(r)
            params, seconds = r["deployed_params"], r["seconds"]
            show(f"{r['search']:<8} {r['trial_id']:>5}  {r['status']:<9} "
                 f"{'-' if r['score'] is None else format(r['score'], '.4f'):>12}  "
                 f"{head:<6} {k:>2} {width:>5} {pool:>4} {fmt(r['learning_rate'] or '-'):>8} "
                 + (f"{r['aux_objective'] or '-':<16} {_shown_weights(r):<{wide}} "
                    if local else "")
                 + f"{'-' if params is None else format(params, ','):>10} "
                 f"{'-' if seconds is None else format(seconds, '.1f'):>8}")

    def _local(self, row):
        """The (aux.objective, aux.objective_weights) pair a best row carries; the
        base's for a row that records none (a trial run before they were recorded)."""
        if row["aux_objective"] is None:
            return objective_from({}, self.tune)
        return row["aux_objective"], row["objective_weights"]

    def _describe(self, designs, local):
        tune = self.tune
        chosen = "; ".join(f"stage {j}: " * (tune.scope == "per_stage")
                           + ", ".join(f"{k} {v}" for k, v in d.to_dict().items())
                           for j, d in enumerate(designs, start=1))
        objective, weights = local
        if objective != "cross_entropy" or tune.search.aux_objective is not None:
            chosen += f"; aux.objective {objective}"
            if weights is not None:
                chosen += f" (weights first {weights['first']}, last {weights['last']})"
        return (f"Found by kgreedy.tune {tune.name} ({tune.tuner}, scope {tune.scope}, "
                f"objective {tune.objective}): {chosen}. Base: {tune.base.description}")


def _shown_design(row):
    """A row's (head, k, width, pool size) as the table shows them: "-" for none (a
    trial that recorded no design) and for what does not apply (a linear head has
    no hidden layers: its k and width)."""
    if row["design"] is None:
        return ("-",) * 4
    design = HeadDesign.from_dict(row["design"])
    layers = design.kind != "linear"
    return tuple("-" if value is None else str(value) for value in (
        design.kind, design.k if layers else None, design.width if layers else None,
        design.pool_size))


def _shown_weights(row):
    """A row's weights as the table shows them: "first>last" pairs, "default" for an
    infopro objective's defaults, "-" where there are none (cross_entropy)."""
    weights = row["objective_weights"]
    if weights is None:
        return "default" if row["aux_objective"] not in (None, "cross_entropy") else "-"
    return encode_weights(ObjectiveWeightsConfig(first=tuple(weights["first"]),
                                                 last=tuple(weights["last"])))
