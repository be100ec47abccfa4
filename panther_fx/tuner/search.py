"""``panther_fx.tune``: a joint Optuna search over whole policies under a quality constraint.

Each trial assigns a choice (dense, or a rank / method) to every unit of the search space, applies the
resulting policy to a working copy of the model, and measures quality (the user's ``evaluate``) and cost
together. The study is two-objective (maximize quality, minimize the cost named by ``objective``) with
``quality >= min_quality`` as a constraint.

Trials run in this order:

1. the dense model (the reference; ``min_quality`` above its quality is an error);
2. sensitivity-guided policies: every layer's factorization error is computed for every choice, and the
   policy for an error budget τ gives each unit its cheapest choice with error <= τ. Sorting the budgets
   gives a path from mild to aggressive policies; a few points spread along it are tried, then the
   boundary between feasible and infeasible is bisected along the path;
3. refine: greedy descent from the best feasible trial, one unit moved to its next cheaper choice at a time,
   the move adding the least factorization error per parameter saved first;
4. the rest come from Optuna's multi-objective TPE sampler with the constraint.

Every step is derived from the trials already in the study, so a study resumed from ``storage`` continues
where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from tabulate import tabulate
from torch import nn
from tqdm.auto import tqdm

from .._checks import is_int
from ..passes import FactorCache
from ..policy import Policy, factored_params
from .measure import Costs, applied, measure_costs, plan_layer
from .space import SearchSpace, SpaceError

__all__ = ["OBJECTIVES", "TrialRow", "TuneError", "TuneResult", "tune"]

OBJECTIVES = ("params", "latency", "memory")
_SPREAD = 4  # points tried along the sensitivity path before bisecting
_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")


class TuneError(ValueError):
    """Arguments the tuner cannot work with; the message names the argument and the value."""


@dataclass(frozen=True)
class TrialRow:
    """One completed trial: its choices ({unit: label}), quality, costs and how it was proposed."""

    number: int
    choices: Mapping[str, str]
    quality: float
    params: int
    layer_params: int  # weights of the Linear and Conv2d layers (biases excluded)
    latency_ms: float | None
    memory_bytes: int | None
    source: str  # "dense", "guided", "refine" or "sampler"
    feasible: bool

    def cost(self, objective: str) -> float:
        return {"params": self.params, "latency": self.latency_ms, "memory": self.memory_bytes}[objective]


@dataclass
class TuneResult:
    """What :func:`tune` found. ``best`` is the cheapest feasible trial (ties: higher quality), ``dense``
    the reference trial; ``policy`` applies ``best``; ``interrupted`` is True after Ctrl-C."""

    study: optuna.Study
    space: SearchSpace
    rows: list[TrialRow]
    objective: str
    min_quality: float
    best: TrialRow
    dense: TrialRow
    interrupted: bool = False
    policy: Policy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = self.policy_of(self.best)

    def policy_of(self, row: TrialRow) -> Policy:
        return self.space.policy(row.choices, source=f"<tuned trial {row.number}>")

    def write(self, path: str | Path) -> Path:
        """Write :attr:`policy` as TOML (read back by ``Policy.load``, the backend and ``convert``)."""
        path = Path(path)
        b = self.best
        header = (f"# written by panther_fx.tune: trial {b.number} of study {self.study.study_name!r}\n"
                  f"# objective = {self.objective}, min_quality = {self.min_quality:g}, quality = {b.quality:.6g}"
                  f" (dense {self.dense.quality:.6g})\n# params {b.params:,} of {self.dense.params:,}; "
                  f"Linear/Conv2d weights {b.layer_params:,} of {self.dense.layer_params:,}\n")
        path.write_text(header + self.policy.to_toml())
        return path

    def pareto(self) -> list[TrialRow]:
        """Trials no other trial beats on both quality and the objective's cost, cheapest first."""
        rows = [r for r in self.rows if r.cost(self.objective) is not None]
        front = [r for r in rows
                 if not any(o.quality >= r.quality and o.cost(self.objective) <= r.cost(self.objective)
                            and (o.quality > r.quality or o.cost(self.objective) < r.cost(self.objective))
                            for o in rows)]
        return sorted(front, key=lambda r: (r.cost(self.objective), -r.quality))

    def table(self, rows: list[TrialRow] | None = None, tablefmt: str = "simple") -> str:
        """Tabulated trials (default: all): quality, params, Linear/Conv2d weights kept, latency, memory."""
        rows = self.rows if rows is None else rows
        dense = self.dense
        body = [(r.number, r.source, f"{r.quality:.4f}", "yes" if r.feasible else "no", f"{r.params:,}",
                 f"{r.layer_params / dense.layer_params:.1%}",
                 "" if r.latency_ms is None else f"{r.latency_ms:.2f}",
                 "" if r.memory_bytes is None else f"{r.memory_bytes / 2**20:.1f}",
                 "*" if r.number == self.best.number else "")
                for r in rows]
        headers = ("trial", "source", "quality", "feasible", "params", "weights kept", "latency ms", "memory MiB",
                   "best")
        return tabulate(body, headers=headers, tablefmt=tablefmt)


# ---- the sensitivity path ------------------------------------------------------------------------------
def _unit_errors(work: nn.Module, space: SearchSpace, cache: FactorCache) -> dict[str, dict[str, float]]:
    """{unit: {label: relative Frobenius error of the factorization}}, the max over a group's layers."""
    errors: dict[str, dict[str, float]] = {}
    for unit in space.units:
        per_choice = {}
        for choice in unit.choices:
            if choice.dense:
                per_choice[choice.label] = 0.0
                continue
            policy = Policy.from_dict({"rule": [{"match": "**", "op": unit.op, **choice.settings}]})
            worst = 0.0
            for path in unit.layers:
                report = plan_layer(path, work.get_submodule(path), policy, cache).report
                worst = max(worst, report.rel_error or 0.0)
            per_choice[choice.label] = worst
        errors[unit.name] = per_choice
    return errors


def _unit_params(unit, label: str) -> int:
    choice = unit.choice(label)
    policy = Policy.from_dict({"rule": [{"match": "**", "op": unit.op, **choice.settings}]})
    total = 0
    for path, (O, I) in zip(unit.layers, unit.shapes):  # r(I + O) also for convs: an estimate for grouped ones
        d = policy.decide(path, unit.op, in_features=I, out_features=O)
        total += factored_params(d.method, I, O, rank=d.rank, num_terms=d.num_terms,
                                 low_rank=d.low_rank) if d.rewrites else O * I
    return total


def sensitivity_path(space: SearchSpace, errors: Mapping[str, Mapping[str, float]]) -> list[dict[str, str]]:
    """Assignments for increasing error budgets τ: each unit takes its cheapest choice with error <= τ.

    Consecutive assignments differ in one unit (ties: a few), from the first compressed layer to every unit
    at its cheapest choice; the all-dense assignment (τ < every error) is not included."""
    params = {(u.name, c.label): _unit_params(u, c.label) for u in space.units for c in u.choices}
    budgets = sorted({e for per in errors.values() for e in per.values() if e > 0})
    path, seen = [], set()
    for tau in budgets:
        assignment = {}
        for unit in space.units:
            ok = [c.label for c in unit.choices if errors[unit.name][c.label] <= tau]
            assignment[unit.name] = min(ok, key=lambda label: params[(unit.name, label)])
        key = space.labels(assignment)
        if key not in seen:
            seen.add(key)
            path.append(assignment)
    return path


def _next_guided(path: list[dict[str, str]], space: SearchSpace, done: Mapping[tuple, bool]) -> dict | None:
    """The next sensitivity-guided assignment given ``done`` ({labels: feasible}), or None when the
    feasibility boundary along ``path`` is located to adjacent points."""
    if not path:
        return None
    index = {space.labels(a): i for i, a in enumerate(path)}
    spread = sorted({round(i * (len(path) - 1) / (_SPREAD - 1)) for i in range(_SPREAD)}) if len(path) > 1 else [0]
    for i in spread:
        if space.labels(path[i]) not in done:
            return path[i]
    tried = {index[k]: ok for k, ok in done.items() if k in index}
    lo = max((i for i, ok in tried.items() if ok), default=-1)
    hi = min((i for i, ok in tried.items() if not ok and i > lo), default=len(path))
    if hi - lo <= 1:
        return None
    return path[(lo + hi) // 2]


def _next_refine(space: SearchSpace, errors: Mapping[str, Mapping[str, float]],
                 params: Mapping[tuple[str, str], int], best: Mapping[str, str], tried: set[tuple]) -> dict | None:
    """Greedy descent from the best feasible assignment: move one unit to its next cheaper choice, the
    move with the least factorization error added per parameter saved first; None when all were tried."""
    moves = []
    for unit in space.units:
        current = best[unit.name]
        cheaper = [c.label for c in unit.choices if params[(unit.name, c.label)] < params[(unit.name, current)]]
        if not cheaper:
            continue
        label = max(cheaper, key=lambda lab: params[(unit.name, lab)])
        candidate = {**best, unit.name: label}
        if space.labels(candidate) in tried:
            continue
        saved = params[(unit.name, current)] - params[(unit.name, label)]
        added = errors[unit.name][label] - errors[unit.name][current]
        moves.append((added / saved, unit.name, candidate))
    return min(moves, key=lambda m: m[:2])[2] if moves else None


# ---- the search ----------------------------------------------------------------------------------------
def _check_args(model, evaluate, min_quality, objective, n_trials, storage, study_name, example_inputs,
                seed) -> float:
    if not isinstance(model, nn.Module):
        raise TuneError(f"model must be an nn.Module, not {type(model).__name__}")
    if isinstance(model, (nn.Linear, nn.Conv2d)):  # candidates are swapped in as children of their parent
        raise TuneError(f"the model itself is a {type(model).__name__} layer: wrap it in a container (e.g. "
                        "nn.Sequential) to tune it")
    if not is_int(seed):
        raise TuneError(f"seed = {seed!r} must be an integer (the sampler's seed)")
    if not callable(evaluate):
        raise TuneError(f"evaluate must be a callable evaluate(model) -> float, not {type(evaluate).__name__}")
    if isinstance(min_quality, bool) or not isinstance(min_quality, numbers.Real) or math.isnan(min_quality):
        raise TuneError(f"min_quality = {min_quality!r} must be a number (the lowest acceptable evaluate(model))")
    if objective not in OBJECTIVES:
        raise TuneError(f"objective = {objective!r} must be one of {', '.join(OBJECTIVES)}")
    if not is_int(n_trials) or n_trials < 1:
        raise TuneError(f"n_trials = {n_trials!r} must be an integer >= 1")
    if study_name is not None and not isinstance(study_name, str):
        raise TuneError(f"study_name = {study_name!r} must be a string (the Optuna study's name)")
    if storage is not None and (not isinstance(storage, str) or "://" not in storage):
        raise TuneError(f"storage = {storage!r} must be an Optuna RDB URL such as 'sqlite:///study.db'")
    if example_inputs is None and objective != "params":
        raise TuneError(f"objective = {objective!r} is measured by running the model: pass example_inputs")
    return float(min_quality)


def _quality(evaluate: Callable[[nn.Module], Any], model: nn.Module) -> float:
    with torch.no_grad():
        value = evaluate(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TuneError(f"evaluate(model) must return a number (higher is better), got {value!r}")
    return float(value)


def _open_study(space: SearchSpace, objective: str, storage: str | None, study_name: str | None,
                seed: int, min_quality: float) -> optuna.Study:
    def constraints(trial: optuna.trial.FrozenTrial) -> tuple[float]:
        return (min_quality - trial.user_attrs["quality"],)  # <= 0 is feasible

    # Optuna >= 5 takes constraints from Trial.set_constraint (_run_trial) and deprecates constraints_func
    func = None if _SET_CONSTRAINT else constraints
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=func, n_startup_trials=5)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler, storage=storage,
                                study_name=study_name, load_if_exists=True)
    signature = {"space": space.signature(), "objective": objective}
    stored = {k: study.user_attrs.get(k) for k in signature}
    if study.trials and stored != signature:
        raise TuneError(f"study {study.study_name!r} in {storage} was run with objective "
                        f"{stored['objective']!r} over another search space (signature {stored['space']}); "
                        f"this run has objective {objective!r}, space {signature['space']}: use another "
                        "study_name")
    for key, value in signature.items():
        study.set_user_attr(key, value)
    return study


def _rows(study: optuna.Study, space: SearchSpace, min_quality: float) -> list[TrialRow]:
    names = {u.name for u in space.units}
    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        rows.append(TrialRow(t.number, {k: v for k, v in t.params.items() if k in names}, a["quality"],
                             a["params"], a.get("layer_params", a.get("linear_params")),  # older studies
                             a.get("latency_ms"), a.get("memory_bytes"),
                             a.get("source", "sampler"), a["quality"] >= min_quality))
    return rows


def _run_trial(study, space, work, evaluate, example_inputs, cache, assignment, source, min_quality):
    if assignment is not None:
        study.enqueue_trial(assignment, skip_if_exists=False)
    trial = study.ask()
    trial.set_user_attr("source", source)
    try:
        labels = {u.name: trial.suggest_categorical(u.name, [c.label for c in u.choices]) for u in space.units}
        with applied(work, space.policy(labels), cache) as report:
            quality = _quality(evaluate, work)
            costs: Costs = measure_costs(work, report, example_inputs)
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    if math.isnan(quality) and source == "dense":
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise TuneError("evaluate(dense model) returned NaN: every trial is compared with it, so the search "
                        "cannot start; check evaluate on the unmodified model")
    if math.isnan(quality):
        warnings.warn(f"panther tune: trial {trial.number} evaluated to NaN; recorded as failed", RuntimeWarning)
        trial.set_user_attr("nan", True)  # an infeasible candidate, unlike a trial failed by Ctrl-C
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    attrs = {"quality": quality, "params": costs.params, "layer_params": costs.layer_params,
             "latency_ms": costs.latency_ms, "memory_bytes": costs.memory_bytes}
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    if _SET_CONSTRAINT:
        trial.set_constraint("min_quality", min_quality - quality)  # <= 0 is feasible
    cost = {"params": costs.params, "latency": costs.latency_ms, "memory": costs.memory_bytes}
    study.tell(trial, [quality, cost[study.user_attrs["objective"]]])


def tune(model: nn.Module, evaluate: Callable[[nn.Module], float], *, example_inputs: Any, min_quality: float,
         objective: str = "params", space: Mapping[str, Any] | None = None, n_trials: int = 50,
         storage: str | None = None, study_name: str | None = None, seed: int = 0) -> TuneResult:
    """Search per-layer ranks / methods of ``model``'s Linear and Conv2d layers (those :func:`panther_fx.convert`
    factorizes: not MHA's out_proj, subclasses or tied weights) for the cheapest policy whose
    ``evaluate(model) >= min_quality``.

    Args:
        model: the dense model (left unchanged: trials run on a deep copy).
        evaluate: ``evaluate(model) -> float``, higher is better; called under ``torch.no_grad()``.
        example_inputs: required: a forward's inputs (tensor, tuple of positional args or dict of keyword args)
            for the latency and memory measurements; pass ``None`` to skip them (objective ``"params"`` only).
        min_quality: the constraint ``evaluate(candidate) >= min_quality``.
        objective: ``"params"`` (all parameters, factors included), ``"latency"`` (median forward ms on the
            model's device) or ``"memory"`` (weight bytes + peak activation bytes of a forward).
        space: ``{pattern: choices}`` (see :mod:`panther_fx.tuner.space`); default: every Linear and Conv2d, svd ranks
            that are powers of two between min(I, O)/16 and break-even, or dense.
        n_trials: trials to run in this call (a resumed study adds this many).
        storage: an Optuna RDB URL (``sqlite:///study.db``) to persist and resume the study.
        study_name: the study in ``storage`` (default: a new name for in-memory studies).
        seed: the sampler's seed (an integer).

    Ctrl-C stops the search after recording the running trial as failed; the result then holds the best
    policy so far (``interrupted=True``) and the stored study stays valid.
    """
    min_quality = _check_args(model, evaluate, min_quality, objective, n_trials, storage, study_name, example_inputs,
                              seed)
    try:
        work = copy.deepcopy(model).eval()
        search_space = SearchSpace.build(work, space)
    except SpaceError as e:
        raise TuneError(str(e)) from None
    cache = FactorCache()
    study = _open_study(search_space, objective, storage, study_name, seed, min_quality)
    errors = _unit_errors(work, search_space, cache)
    params = {(u.name, c.label): _unit_params(u, c.label) for u in search_space.units for c in u.choices}
    path = sensitivity_path(search_space, errors)
    interrupted = False
    with _quiet_optuna(), tqdm(total=n_trials, desc="panther tune", unit="trial") as bar:
        for _ in range(n_trials):
            rows = _rows(study, search_space, min_quality)
            nan = [t.params for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
                   if t.user_attrs.get("nan")]
            assignment, source = _propose(search_space, rows, nan, path, errors, params, objective, min_quality)
            try:
                _run_trial(study, search_space, work, evaluate, example_inputs, cache, assignment, source,
                           min_quality)
            except KeyboardInterrupt:
                interrupted = True
                warnings.warn("panther tune: interrupted; returning the best policy so far", RuntimeWarning)
                break
            bar.update(1)
            best = _best(_rows(study, search_space, min_quality), objective)
            if best is not None:
                bar.set_postfix_str(f"best #{best.number}: quality {best.quality:.4g}, "
                                    f"{objective} {best.cost(objective):.4g}")
    return _result(study, search_space, objective, min_quality, interrupted)


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna logs every trial at INFO level; the progress bar says the same."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _best(rows: list[TrialRow], objective: str) -> TrialRow | None:
    feasible = [r for r in rows if r.feasible]
    return min(feasible, key=lambda r: (r.cost(objective), -r.quality)) if feasible else None


def _propose(space, rows, nan, path, errors, params, objective, min_quality) -> tuple[dict | None, str]:
    """The next assignment and its source: dense first, then the sensitivity path, then greedy descent
    from the best feasible trial; ``(None, "sampler")`` hands over to Optuna's sampler. Assignments in
    ``nan`` (evaluated to NaN) count as infeasible."""
    dense_row = next((r for r in rows if r.source == "dense"), None)
    if dense_row is None:
        return {u.name: "dense" for u in space.units}, "dense"
    if not dense_row.feasible:
        raise TuneError(f"min_quality = {min_quality:g} is unreachable: the dense model scores "
                        f"{dense_row.quality:.6g}")
    names = {u.name for u in space.units}
    done = {space.labels(a): False for a in nan if set(a) == names}
    done.update({space.labels(r.choices): r.feasible for r in rows if set(r.choices) == names})
    guided = _next_guided(path, space, done)
    if guided is not None:
        return guided, "guided"
    refined = _next_refine(space, errors, params, _best(rows, objective).choices, set(done))
    if refined is not None:
        return refined, "refine"
    return None, "sampler"


def _result(study, space, objective, min_quality, interrupted) -> TuneResult:
    rows = _rows(study, space, min_quality)
    dense = next((r for r in rows if r.source == "dense"), None)
    if dense is None:
        raise TuneError("the search stopped before the dense model was evaluated: no policy to return")
    if not dense.feasible:
        raise TuneError(f"min_quality = {min_quality:g} is unreachable: the dense model scores {dense.quality:.6g}")
    return TuneResult(study, space, rows, objective, min_quality, _best(rows, objective), dense, interrupted)
