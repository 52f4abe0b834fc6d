"""Hyper-parameter search with Optuna over train.py's own flags; every trial is a normal run folder.

    python tune.py --trials 20 --space space.yaml --model BaseModel --resize 96,72 --epochs 15
    python tune.py --trials 20 --space space.yaml --study kf_search --kfold 5 --epochs 15   # objective: OOF F1

`--space` is a YAML (or JSON) file with one entry per train.py flag to search:

    lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float (log scale)
    weight_decay: {low: 0.0, high: 0.1}          # a float
    epochs: {low: 5, high: 20, step: 5}          # whole numbers: an int
    criterion: {choices: [cross_entropy, new_focal]}   # one of these

Every other flag given here is fixed for every trial. A trial trains into runs/<study>/trial<N>
(RUN/config.json records its options, as for any run) and scores its best val macro F1 (a k-fold
trial: its out-of-fold F1). Pruning stops a trial whose per-epoch val F1 falls behind the
others' at the same epoch (`--pruner median`, Optuna's MedianPruner, or `hyperband`; `none`).

The study lives in runs/<study>/study.db (SQLite; `--storage` takes any Optuna database URL,
PostgreSQL or MySQL for several machines): a killed tune.py resumes where it stopped, the
finished trials kept and the one it was running tried again, and several tune.py processes on
one study share its trials (`--trials` counts them all together). At the end: a table of the
trials, each parameter's importance, and runs/<study>/best_config.yaml, which
`python train.py --config runs/<study>/best_config.yaml` repeats.

Optuna is optional: `pip install optuna` (a one-line message says so when it is missing).
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import math
import os
import sys
import time

from maskcls import cli
from maskcls.atomic import write_csv
from maskcls.cli import UserError
from maskcls.readers import read_config
from maskcls.runfolder import RunLock
from maskcls.summary import summarize

PRUNERS = ("median", "hyperband", "none")
START_GRACE = 300  # seconds a starting trial may take to make its run folder (reading data, face boxes)
BUDGET_ATTR = "over_budget"  # a trial started after --trials were already taken: pruned unrun


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("tune.py needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class TuneParser(cli.ArgumentParser):
    """tune.py's own flags; every other word is a train.py flag, fixed for every trial (`args.fixed`)."""

    def parse_args(self, args=None, namespace=None):
        argv, self.typed = cli._snake_flags(sys.argv[1:] if args is None else [str(a) for a in args])
        parsed, rest = self.parse_known_args(argv, namespace)
        parsed.fixed = rest
        return parsed


def get_args_parser():
    parser = TuneParser(description="Search train.py's flags with Optuna; every trial is a run folder. "
                                            "Flags not listed here are train.py's, fixed for every trial.",
                                epilog="Every flag also has a kebab-case spelling (--study-name).")
    parser.add_argument("--trials", type=cli.positive_int, required=True,
                        help="trials to finish in the study (every process on it counted together)")
    parser.add_argument("--space", required=True, metavar="YAML", help="the flags to search and their ranges")
    parser.add_argument("--study", default="study", help="the study's name and its folder under --model_dir")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna's database; default: sqlite:///<model_dir>/<study>/study.db")
    parser.add_argument("--pruner", choices=PRUNERS, default="median",
                        help="stop trials whose per-epoch val F1 falls behind (median: Optuna's MedianPruner)")
    parser.add_argument("--sampler_seed", type=cli.number(int, 0), default=None,
                        help="seeds Optuna's TPE sampler (default: not seeded)")
    return parser


# ---------------------------------------------------------------- the search space
def read_space(path, train_parser):
    """{flag: spec} from the YAML file, each a train.py flag with a float, int or categorical range."""
    options = cli.read_options_file(path)
    flags = {a.dest for a in train_parser._actions if a.option_strings}
    space = {}
    for key, spec in options.items():
        name = str(key).replace("-", "_")
        if name not in flags:
            raise UserError(f"{path}: {key!r} is not a train.py flag (python train.py --help lists them)")
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise UserError(f"{path}: {key}: expected {{low: A, high: B[, log: true, step: S]}} or {{choices: [...]}}")
        if "choices" in spec and (not isinstance(spec["choices"], list) or not spec["choices"]):
            raise UserError(f"{path}: {key}: choices must be a non-empty list")
        if "low" in spec and not (isinstance(spec["low"], (int, float)) and isinstance(spec["high"], (int, float))
                                  and spec["low"] < spec["high"]):
            raise UserError(f"{path}: {key}: needs numbers low < high, got {spec['low']!r}, {spec['high']!r}")
        space[name] = spec
    if not space:
        raise UserError(f"{path} names no flag to search")
    return space


def suggest(trial, space):
    """The trial's values for the searched flags."""
    values = {}
    for name, spec in space.items():
        if "choices" in spec:
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("low", "high")) and \
                not spec.get("log") or isinstance(spec.get("step"), int):
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step", 1),
                                             log=bool(spec.get("log")))
        else:
            values[name] = trial.suggest_float(name, spec["low"], spec["high"], log=bool(spec.get("log")),
                                               step=spec.get("step"))
    return values


def trial_argv(fixed, values, study_dir, number):
    """train.py's command line of one trial: the fixed flags, the trial's values, its run folder."""
    argv = list(fixed)
    for name, value in values.items():
        argv += [f"--{name}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv + ["--model_dir", study_dir, "--name", f"trial{number:03d}"]


# ---------------------------------------------------------------- the study
def open_study(optuna, args, study_dir):
    storage = args.storage or f"sqlite:///{os.path.abspath(os.path.join(study_dir, 'study.db'))}"
    os.makedirs(study_dir, exist_ok=True)
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(),
              "none": lambda: optuna.pruners.NopPruner()}[args.pruner]()
    try:
        engine = {"connect_args": {"timeout": 120}} if storage.startswith("sqlite") else {}
        rdb = optuna.storages.RDBStorage(storage, engine_kwargs=engine)
        return optuna.create_study(study_name=args.study, storage=rdb, direction="maximize", load_if_exists=True,
                                   pruner=pruner, sampler=optuna.samplers.TPESampler(seed=args.sampler_seed))
    except (ImportError, ValueError, optuna.exceptions.OptunaError) as err:
        raise UserError(f"--storage {storage}: {str(err).splitlines()[0]}") from None


def retry_dead_trials(optuna, study, study_dir):
    """Trials left RUNNING by a killed tune.py (their run folder's lock is free: no process trains
    there; or, without a folder, started over START_GRACE seconds ago) are marked failed and
    their values queued again. Returns how many."""
    dead = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        folder = os.path.join(study_dir, f"trial{trial.number:03d}")
        if not os.path.isdir(folder):
            started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
            if time.time() - started > START_GRACE:  # another process would have made it by now
                dead.append(trial)
            continue
        try:
            with RunLock(folder):
                dead.append(trial)
        except UserError:
            continue  # still training in another process
    retried = 0
    for trial in dead:
        try:  # only the process that marks it failed queues it again: no duplicate between processes
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue
        study.enqueue_trial(trial.params)
        retried += 1
    return retried


def taken(optuna, study, before):
    """Trials that count towards --trials among those numbered below `before`."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states)
               if t.number < before and not t.user_attrs.get(BUDGET_ATTR))


def make_objective(optuna, args, space, fixed, study_dir):
    import train

    def objective(trial):
        if taken(optuna, trial.study, trial.number) >= args.trials:  # others took the budget meanwhile
            trial.set_user_attr(BUDGET_ATTR, True)
            trial.study.stop()
            raise optuna.TrialPruned("over the --trials budget")
        values = suggest(trial, space)
        argv = trial_argv(fixed, values, study_dir, trial.number)
        trial.set_user_attr("run", os.path.join(study_dir, f"trial{trial.number:03d}"))
        print(f"--- trial {trial.number}: {', '.join(f'{k}={v}' for k, v in values.items())}", flush=True)
        parsed = train.get_args_parser().parse_args(argv)

        def report(step, val_f1):
            if val_f1 == val_f1:
                trial.report(val_f1, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"val F1 {val_f1:.4f} at step {step}")
        row = summarize(train.main(parsed, monitor=report))
        score = row["oof_f1"] if row["kind"] == "kfold" else row["val_f1"]
        if not math.isfinite(score):
            raise UserError(f"{row['run']} has no validation score to maximize (--val_ratio 0?)")
        return score
    return objective


# ---------------------------------------------------------------- the report
def report_study(optuna, study, study_dir, train_parser):
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"))
    if BUDGET_ATTR in str(list(frame.columns)):
        frame = frame[frame[f"user_attrs_{BUDGET_ATTR}"].isna()].drop(columns=[f"user_attrs_{BUDGET_ATTR}"])
    frame["duration"] = frame["duration"].dt.total_seconds().round(1)
    frame = frame.rename(columns=lambda c: c.replace("params_", "").replace("user_attrs_", ""))
    write_csv(frame, os.path.join(study_dir, "trials.csv"))
    print(frame.to_string(index=False))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print("no trial completed yet")
        return None
    best = study.best_trial
    print(f"best: trial {best.number}, value {best.value:.4f}, {best.params}")
    if len(complete) >= 2:
        try:
            importance = optuna.importance.get_param_importances(study)
            print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in importance.items()))
        except (RuntimeError, ValueError, ZeroDivisionError) as err:
            print(f"importance: not computed ({err})")
    return write_best_config(best, study_dir, train_parser)


def write_best_config(best, study_dir, train_parser):
    """The best trial's options as a --config file (what config.json records, less the keys
    training derives or that name a run)."""
    import yaml
    config = read_config(best.user_attrs["run"])
    skip = set(train_parser.derived_keys) | {"name", "model_dir", "resume", "config"}
    flags = {a.dest for a in train_parser._actions if a.option_strings}
    options = {k: v for k, v in config.items() if k in flags and k not in skip}
    path = os.path.join(study_dir, "best_config.yaml")
    from maskcls.atomic import replacing
    with replacing(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(options, f, sort_keys=True)
    print(f"wrote {path}: python train.py --config {path}")
    return path


def main(args):
    optuna = require_optuna()
    fixed = args.fixed
    import train
    train_parser = train.get_args_parser()
    space = read_space(args.space, train_parser)
    train_parser.parse_args(list(fixed))  # the fixed flags, checked once before any trial
    study_dir = os.path.join(train_parser.parse_args(list(fixed)).model_dir, args.study)
    study = open_study(optuna, args, study_dir)
    retried = retry_dead_trials(optuna, study, study_dir)
    if retried:
        print(f"{retried} trial(s) of a killed tune.py queued again")
    start = time.perf_counter()
    done = taken(optuna, study, math.inf)
    print(f"study {args.study} ({study_dir}): {done} of {args.trials} trials taken; {args.pruner} pruning")
    if done < args.trials:
        stop = optuna.study.MaxTrialsCallback(args.trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.PRUNED))
        study.optimize(make_objective(optuna, args, space, fixed, study_dir), n_trials=args.trials - done,
                       callbacks=[stop], catch=())
    print(f"{cli.duration(time.perf_counter() - start)} in this process")
    return report_study(optuna, study, study_dir, train_parser)


if __name__ == "__main__":
    cli.run(main, get_args_parser)
