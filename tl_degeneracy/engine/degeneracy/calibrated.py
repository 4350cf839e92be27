"""An SGLD estimate that chooses its own step size and chain length: what the degeneracy
report runs when no step size is given.

1. Pilots, from the largest candidate step size ε down: 2 chains of `pilot_steps` steps at ε,
   and 2 chains at the next smaller ε' for the same Langevin time `ε × pilot_steps` (so more
   steps). Chains that follow the same diffusion for the same time estimate the same quantity
   whatever their step size as long as the discretisation is fine, even before they have
   converged; so two pilots that agree say that ε is small enough. A pilot is stable when no
   chain diverged, λ̂ is finite and non-negative, and N_eff is not clearly (3 standard
   errors) above the section's bound `N − free`. Runs are reused:
   the pilot at ε' run for a pair is the start of its own pair's pilot (continued chains give
   the same traces as one longer run).
2. The chosen step size is the largest one whose pilot is stable and agrees with the pilot at
   the next smaller step size (relative difference at most `tolerance`).
3. The estimate: `SGLDConfig.n_chains` chains of `SGLDConfig.n_steps` steps at that step size,
   continued to twice their length while the split R-hat is above `rhat_max` or the chains
   disagree (standard error above half the tolerance × λ̂: with few parameters each chain's
   λ̂ is noisy), up to `max_steps` per chain and within the budget (`max_total_steps`,
   `max_seconds`). If its chains diverge, exceed the bound or still disagree, the next
   smaller stable step size is tried. A budget too small for one pilot and the estimate
   (`minimum_budget`) is refused.
4. The localisation check (`localisation.localisation_check`): `pilot_chains` chains at
   γ / `localisation_ratio`, with the estimate's step size and steps. If their λ̂ differs from
   the estimate's by more than `tolerance`, the estimate measures the localisation term rather
   than the loss (nβ·h not ≫ γ in some directions) and is not a result. Run only for an
   estimate that passed everything else; the budget keeps its steps in reserve.

The result says whether the estimate is a result and, when it is not, why, with the best
stable setting found (`CalibratedLLC.reasons`, `CalibratedLLC.result`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.degeneracy.config import CalibrationConfig, SGLDConfig, SGLDWarning
from tl_degeneracy.engine.degeneracy.diagnostics import LLCResult, count_text
from tl_degeneracy.engine.degeneracy.discretisation import (
    DiscretisationCheck,
    discretisation_check,
)
from tl_degeneracy.engine.degeneracy.localisation import LocalisationCheck, localisation_check
from tl_degeneracy.engine.degeneracy.problems import LLCProblem
from tl_degeneracy.engine.degeneracy.sgld import continue_llc, estimate_llc


@dataclass(frozen=True)
class Pilot:
    """One pilot run of the calibration, as a row."""

    step_size: float
    n_steps: int
    llc: float
    llc_se: float
    diverged: int
    stable: bool
    agrees_with_next: bool | None = None
    """Whether λ̂ agrees with the pilot at the next smaller step size (None: not compared)."""


@dataclass(repr=False)
class CalibratedLLC(BriefRepr):
    """A calibrated SGLD estimate: the pilots, the chosen step size, the chains' lengths and
    the estimate itself; `reasons` is empty when the estimate is a result."""

    result: LLCResult | None
    """The estimate (at the chosen step size or, when none passed, at the best stable setting
    found; None when no pilot was stable)."""
    pilots: list[Pilot]
    chosen: float | None
    """The step size that passed the calibration (or a smaller one that its pilot agreed
    with, when the chains diverged or disagreed at it); None: none passed."""
    lengths: list[tuple[int, float]] = field(default_factory=list)
    """(steps per chain, R-hat) after each length the chains were run to."""
    bound: float | None = None
    """The section's `N − free`, if known."""
    tolerance: float = 0.2
    """`CalibrationConfig.tolerance`: half of it is the largest standard error of the
    estimate relative to λ̂ (chains that agree)."""
    steps_used: int = 0
    """SGLD steps over all pilots and chains."""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    """What happened on the way (step sizes given up, budget reached)."""
    localisation: LocalisationCheck | None = None
    """λ̂ at a smaller γ against the estimate's (None: not run)."""
    check_localisation: bool = False
    """Whether the estimate must pass the localisation check to be a result."""
    discretisation: DiscretisationCheck | None = None
    """λ̂ at the next smaller step size over the same Langevin time (None: not run)."""
    check_discretisation: bool = False
    """Whether the estimate must pass the discretisation check to be a result."""
    higher_gammas: list[dict[str, Any]] = field(default_factory=list)
    """The estimates at higher γ that the localisation check rejected before this one
    (γ, ε, steps, λ̂ and its se, λ̂ at the lower γ), highest first."""

    @property
    def reasons(self) -> list[str]:
        """Why the estimate is not a result (empty: it is)."""
        if self.result is None:
            return [*self.notes] or ["no stable step size"]
        out = [] if self.chosen is not None else ["no step size passed the calibration"]
        out += self.result.unconverged_reasons(self.bound)
        r = self.result
        if math.isfinite(r.llc) and not r.llc_se <= self.tolerance / 2 * abs(r.llc):
            out.append(f"the chains disagree (se {r.llc_se:.3g} > {self.tolerance / 2:g} × λ̂)")
        if self.check_discretisation and not out:
            if self.discretisation is None:
                out.append(
                    "the step-size check did not run (budget, or no smaller step size in the grid)"
                )
            elif (why := self.discretisation.reason()) is not None:
                out.append(why)
        if self.check_localisation and not out:
            if self.localisation is None:
                long = [n for n in self.notes if n.startswith("the localisation check needs")]
                out.append(long[-1] if long else "the localisation check did not run (budget)")
            elif (why := self.localisation.reason()) is not None:
                out.append(why)
        return out

    @property
    def held_by_localisation(self) -> bool:
        """True when the localisation check is the one reason the estimate is not a result."""
        return (
            self.localisation is not None
            and not self.localisation.passed
            and self.reasons == [self.localisation.reason()]
        )

    @property
    def converged(self) -> bool:
        return not self.reasons

    def table(self) -> list[dict[str, str]]:
        """The pilots as rows of strings."""
        return [
            {
                "ε": f"{p.step_size:g}",
                "steps": str(p.n_steps),
                "N_eff = 2λ̂": f"{2 * p.llc:.4g} ± {2 * p.llc_se:.2g}",
                "diverged": str(p.diverged),
                "stable": "yes" if p.stable else "no",
                "agrees with next": {None: "—", True: "yes", False: "no"}[p.agrees_with_next],
            }
            for p in self.pilots
        ]

    def to_json(self) -> dict[str, Any]:
        """Everything but the estimate (saved with its section)."""
        return {
            "pilots": [asdict(p) for p in self.pilots],
            "chosen": self.chosen,
            "lengths": [list(x) for x in self.lengths],
            "bound": self.bound,
            "tolerance": self.tolerance,
            "steps_used": self.steps_used,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "localisation": None if self.localisation is None else self.localisation.to_json(),
            "check_localisation": self.check_localisation,
            "discretisation": (
                None if self.discretisation is None else self.discretisation.to_json()
            ),
            "check_discretisation": self.check_discretisation,
            "higher_gammas": [dict(h) for h in self.higher_gammas],
        }

    @classmethod
    def from_json(cls, meta: dict[str, Any], result: LLCResult | None) -> CalibratedLLC:
        return cls(
            result,
            [Pilot(**p) for p in meta["pilots"]],
            meta["chosen"],
            [(int(a), float(b)) for a, b in meta["lengths"]],
            meta["bound"],
            meta["tolerance"],
            meta["steps_used"],
            meta["seconds"],
            list(meta["notes"]),
            None
            if meta.get("localisation") is None
            else LocalisationCheck.from_json(meta["localisation"]),
            bool(meta.get("check_localisation", False)),
            None
            if meta.get("discretisation") is None
            else DiscretisationCheck.from_json(meta["discretisation"]),
            bool(meta.get("check_discretisation", False)),
            [dict(h) for h in meta.get("higher_gammas", [])],
        )


class _Budget:
    """SGLD steps and seconds left to one calibrated estimate."""

    def __init__(self, cal: CalibrationConfig):
        self.cal, self.start, self.steps, self.sampling = cal, time.perf_counter(), 0, 0.0

    def allows(self, steps: int, reserve: int = 0) -> bool:
        """Whether `steps` more fit, keeping `reserve` steps for later."""
        if self.steps + steps + reserve > self.cal.max_total_steps:
            return False
        if self.cal.max_seconds is None or self.steps == 0:
            return True
        per_step = self.sampling / self.steps
        left = self.cal.max_seconds - (time.perf_counter() - self.start)
        return (steps + reserve) * per_step <= left

    def spend(self, steps: int, seconds: float) -> None:
        self.steps += steps
        self.sampling += seconds


class _Pilots:
    """Pilot chains per step size, run as long as the longest window asked of them."""

    def __init__(
        self, problem: LLCProblem, cfg: SGLDConfig, cal: CalibrationConfig, budget: _Budget
    ):
        self.problem, self.cfg, self.cal, self.budget = problem, cfg, cal, budget
        self.runs: dict[float, LLCResult] = {}

    def window(self, eps: float, n: int, bound: float | None) -> Pilot | None:
        """λ̂ of the pilot at `eps` over its first `n` steps (the first quarter dropped);
        None when the budget does not allow the steps."""
        have = self.runs.get(eps)
        done = have.config.n_steps if have is not None else 0
        if done < n:
            # the estimate's first chains and their localisation check
            at = replace(self.cfg, step_size=eps)
            reserve = self.cfg.n_chains * self.cfg.n_steps + _check_steps(self.cal, at)
            if not self.budget.allows(self.cal.pilot_chains * (n - done), reserve):
                return None
            if have is None:
                run = replace(
                    self.cfg, step_size=eps, n_chains=self.cal.pilot_chains, n_steps=n, n_burnin=0
                )
                have = estimate_llc(self.problem, run, warn=False)
            else:
                seconds = have.seconds
                have = continue_llc(self.problem, have, n - done, n_burnin=0, warn=False)
                have.seconds -= seconds
            self.budget.spend(self.cal.pilot_chains * (n - done), have.seconds)
            self.runs[eps] = have
        assert have is not None
        post = have.loss_traces[:, n // 4 : n]
        per_chain = have.nbeta * (post.mean(1) - have.loss_at_star)
        diverged = int((~per_chain.isfinite()).sum())
        llc = float(per_chain.mean())
        se = float(per_chain.std() / math.sqrt(len(per_chain))) if len(per_chain) > 1 else 0.0
        above = bound is not None and 2 * (llc - 3 * se) > bound  # clearly above the bound
        stable = diverged == 0 and math.isfinite(llc) and llc >= 0 and not above
        return Pilot(eps, n, llc, se, diverged, stable)


def calibrated_llc(
    problem: LLCProblem,
    config: SGLDConfig | None = None,
    calibration: CalibrationConfig | None = None,
    bound: float | None = None,
    progress: bool = False,
    largest: float | None = None,
) -> CalibratedLLC:
    """λ̂ with the step size chosen by pilot chains and the chains run until R-hat is at most
    `config.rhat_max` (within the budget); `config.step_size` is ignored. `bound` (a section's
    `N − free`) marks pilots and estimates above it as unstable. `largest` skips candidate
    step sizes above it (the whole model is no more stable than its stiffest section). When
    the localisation check is the one reason the estimate is not a result, γ is lowered by
    `localisation_ratio` (up to `calibration.lower_gamma` times) and the estimate calibrated
    anew there. Warns (`SGLDWarning`) once when the estimate is not a result, with the
    reasons."""
    cfg = config or SGLDConfig()
    cal = calibration or CalibrationConfig()
    _check_budget(cfg, cal, largest)
    budget = _Budget(cal)  # one budget for the estimate at every γ it tries
    out = _calibrated_at(problem, cfg, cal, bound, progress, largest, budget)
    lowered: list[str] = []  # one note per γ given up, kept across every lowering
    for _ in range(cal.lower_gamma):
        if not out.held_by_localisation or cal.localisation_ratio is None:
            break
        above, check = out, out.localisation
        assert above.result is not None and check is not None
        r = above.result
        start = min(x for x in (largest, above.chosen, r.config.step_size) if x is not None)
        lower = replace(cfg, gamma=check.gamma_low, step_size=start)
        need = relaxation_steps(lower, cal)
        if need > cal.max_steps:
            above.notes.append(
                f"γ = {check.gamma_low:g} was not tried: its chains would need {need:,} steps "
                f"to relax at ε = {_smallest_step(lower):g}, more than max_steps = "
                f"{cal.max_steps:,}"
            )
            break
        out = _calibrated_at(
            problem, replace(cfg, gamma=check.gamma_low), cal, bound, progress, start, budget
        )
        out.higher_gammas = [
            *above.higher_gammas,
            {
                "gamma": r.config.gamma,
                "step_size": r.config.step_size,
                "n_steps": r.config.n_steps,
                "llc": r.llc,
                "llc_se": r.llc_se,
                "gamma_low": check.gamma_low,
                "llc_low": check.llc_low,
            },
        ]
        lowered.append(
            f"at γ = {r.config.gamma:g} λ̂ = {r.llc:.4g} ± {r.llc_se:.2g} against "
            f"{check.llc_low:.4g} at γ = {check.gamma_low:g}: γ lowered to {check.gamma_low:g}"
        )
        out.notes[:0] = lowered
    if out.reasons:
        warnings.warn(
            f"SGLD estimate not converged ({problem.n_params:,} parameters): "
            + "; ".join(out.reasons),
            SGLDWarning,
            stacklevel=2,
        )
    return out


def _calibrated_at(
    problem: LLCProblem,
    cfg: SGLDConfig,
    cal: CalibrationConfig,
    bound: float | None,
    progress: bool,
    largest: float | None,
    budget: _Budget,
) -> CalibratedLLC:
    """One calibrated estimate at `cfg.gamma`: pilots, chains, the step-size and localisation
    checks (no warning); `steps_used` and `seconds` count from the start of `budget`."""
    pilots = _Pilots(problem, cfg, cal, budget)
    grid = sorted({e for e in cal.step_sizes if largest is None or e <= largest}, reverse=True)
    rows: list[Pilot] = []
    notes: list[str] = []
    chosen: float | None = None
    stable: list[float] = []
    for i, eps in enumerate(grid):
        here = pilots.window(eps, cal.pilot_steps, bound)
        if here is None:
            notes.append(f"the budget ended the calibration before ε = {eps:g}")
            break
        if not here.stable or i + 1 == len(grid):
            rows.append(here)
            stable += [eps] if here.stable else []
            continue
        stable.append(eps)
        smaller = grid[i + 1]
        below = pilots.window(smaller, round(cal.pilot_steps * eps / smaller), bound)
        if below is None:
            rows.append(here)
            notes.append(f"the budget ended the calibration before ε = {smaller:g}")
            break
        agrees = below.stable and abs(here.llc - below.llc) <= cal.tolerance * abs(below.llc)
        rows += [replace(here, agrees_with_next=agrees), below]
        if agrees:
            chosen = eps
            stable.append(smaller)
            break
    if chosen is None and not notes:
        notes.append(
            f"no step size in {', '.join(f'{e:g}' for e in grid)} gave a stable pilot that "
            "agrees with the next smaller one"
        )
    out = CalibratedLLC(None, rows, chosen, bound=bound, tolerance=cal.tolerance, notes=notes)
    # the estimate: the chosen step size (else the smallest stable one), then each smaller
    # one while the chains diverge, disagree, exceed the bound or fail the step-size check
    candidates = [e for e in grid if e <= chosen] if chosen is not None else stable[-1:]
    for i, eps in enumerate(candidates):
        out.chosen = eps if chosen is not None else None
        out.discretisation = None
        run = replace(cfg, step_size=eps)
        out.result = _run_to_convergence(problem, run, cal, budget, out, progress)
        why = _unstable(out.result, cal, bound) if out.result is not None else ""
        finer = candidates[i + 1] if i + 1 < len(candidates) else None
        if out.result is not None and not why and not out.reasons and finer is not None:
            if cal.discretisation_check:
                steps = cal.pilot_chains * round(out.result.config.n_steps * eps / finer)
                reserve = max(0, _check_steps(cal, out.result.config) - steps)
                if budget.allows(steps, reserve):
                    out.discretisation = discretisation_check(
                        problem, out.result, finer, cal.pilot_chains, cal.tolerance
                    )
                    budget.spend(out.discretisation.steps, out.discretisation.seconds)
                    why = out.discretisation.reason() or ""
        if not why:
            break
        out.notes.append(f"at ε = {eps:g} {why}: a smaller step size was tried")
    result = out.result
    out.check_discretisation = cal.discretisation_check and result is not None
    if cal.localisation_ratio is not None and result is not None:
        passed = not out.reasons  # everything but the check
        out.check_localisation = True
        low = replace(result.config, gamma=result.config.gamma / cal.localisation_ratio)
        n_steps = max(result.config.n_steps, relaxation_steps(low, cal))
        if passed and n_steps > cal.max_steps:
            out.notes.append(
                f"the localisation check needs {n_steps:,} steps per chain to relax at γ = "
                f"{low.gamma:g} (ε = {_smallest_step(low):g}), more than max_steps = "
                f"{cal.max_steps:,}"
            )
        elif passed and budget.allows(cal.pilot_chains * n_steps):
            out.localisation = localisation_check(
                problem, result, cal.localisation_ratio, cal.pilot_chains, cal.tolerance, n_steps
            )
            budget.spend(out.localisation.steps, out.localisation.seconds)
    out.steps_used = budget.steps
    out.seconds = time.perf_counter() - budget.start
    return out


def _unstable(result: LLCResult, cal: CalibrationConfig, bound: float | None) -> str:
    """Why the chains, run as long as they could be, call for a smaller step size ("" if
    they do not): they diverged, exceed the bound, or still disagree (standard error above
    half the tolerance × λ̂)."""
    if why := _needs_smaller_step(result, bound):
        return why
    if not result.llc_se <= cal.tolerance / 2 * abs(result.llc):
        return f"the chains disagreed (λ̂ = {result.llc:.4g} ± {result.llc_se:.2g})"
    return ""


def _needs_smaller_step(result: LLCResult, bound: float | None) -> str:
    """What longer chains cannot mend ("" if nothing): divergence, N_eff above the bound."""
    if bool(result.diverged.any()) or not math.isfinite(result.llc):
        return f"{int(result.diverged.sum())} of {len(result.diverged)} chains diverged"
    if bound is not None and result.n_eff > bound:
        return f"N_eff {count_text(result.n_eff)} exceeded the bound {bound:,.0f}"
    return ""


def _too_short(result: LLCResult, cfg: SGLDConfig, cal: CalibrationConfig) -> str:
    """Why the chains should run longer ("" if not): R-hat above `rhat_max`, or chains that
    disagree (few parameters: each chain's λ̂ is noisy, and longer chains average it)."""
    if not result.rhat <= cfg.rhat_max:
        return f"R-hat still above {cfg.rhat_max:g}"
    if not result.llc_se <= cal.tolerance / 2 * abs(result.llc):
        return "the chains still disagree"
    return ""


def minimum_budget(cfg: SGLDConfig, cal: CalibrationConfig, largest: float | None = None) -> int:
    """The fewest SGLD steps a calibrated estimate can run on: one pilot at the largest step
    size tried, with the estimate's first chains and their checks kept in reserve."""
    first = max((e for e in cal.step_sizes if largest is None or e <= largest), default=None)
    at = cfg if first is None else replace(cfg, step_size=first)
    chains = cfg.n_chains * max(cfg.n_steps, relaxation_steps(at, cal))
    return cal.pilot_chains * cal.pilot_steps + chains + _check_steps(cal, at)


def _check_budget(cfg: SGLDConfig, cal: CalibrationConfig, largest: float | None) -> None:
    """Refuse a budget that cannot run one pilot and the estimate (it used to run nothing and
    blame the budget in a note)."""
    need = minimum_budget(cfg, cal, largest)
    if cal.max_total_steps < need:
        raise ValueError(
            f"CalibrationConfig(max_total_steps={cal.max_total_steps:,}) cannot run a "
            f"calibrated estimate: one pilot ({cal.pilot_chains} × {cal.pilot_steps} steps), "
            f"the estimate's first chains ({cfg.n_chains} × {cfg.n_steps}) and their checks "
            f"need at least {need:,} steps; raise max_total_steps (--max-total-steps), or run "
            "fixed settings (an SGLDConfig with its step_size, calibration=None; --step-size)"
        )


def _run_to_convergence(
    problem: LLCProblem,
    cfg: SGLDConfig,
    cal: CalibrationConfig,
    budget: _Budget,
    out: CalibratedLLC,
    progress: bool = False,
) -> LLCResult | None:
    """Chains at `cfg`, at least `relaxation_steps` long, doubled in length while R-hat asks
    for it and the budget allows."""
    need = relaxation_steps(cfg, cal)
    if need > cal.max_steps:
        out.notes.append(
            f"at γ = {cfg.gamma:g} and ε = {_smallest_step(cfg):g} the chains need {need:,} "
            f"steps to relax ({cal.min_relaxations:g} × 2/(εγ)), more than max_steps = "
            f"{cal.max_steps:,}"
        )
        return None
    if need > cfg.n_steps:
        burnin = round(need * cfg.n_burnin / cfg.n_steps)
        cfg = replace(cfg, n_steps=need, n_burnin=burnin)
    if not budget.allows(cfg.n_chains * cfg.n_steps, _check_steps(cal, cfg)):
        out.notes.append(f"the budget left no room for the estimate at ε = {cfg.step_size:g}")
        return None
    result = estimate_llc(problem, cfg, progress, warn=False)
    budget.spend(cfg.n_chains * cfg.n_steps, result.seconds)
    out.lengths = [(cfg.n_steps, result.rhat)]
    while (why := _too_short(result, cfg, cal)) and not _needs_smaller_step(result, out.bound):
        more = result.config.n_steps
        if result.config.n_steps + more > cal.max_steps:
            out.notes.append(f"{why} at {result.config.n_steps:,} steps (max_steps)")
            break
        longer = replace(cfg, n_steps=result.config.n_steps + more)
        if not budget.allows(cfg.n_chains * more, _check_steps(cal, longer)):
            out.notes.append("the budget stopped the chains from running longer")
            break
        before = result.seconds
        result = continue_llc(problem, result, more, progress=progress, warn=False)
        budget.spend(cfg.n_chains * more, result.seconds - before)
        out.lengths.append((result.config.n_steps, result.rhat))
    return result


def _check_chains(cal: CalibrationConfig) -> int:
    """Chains of the localisation check (0: no check)."""
    return cal.pilot_chains if cal.localisation_ratio is not None else 0


def _check_steps(cal: CalibrationConfig, cfg: SGLDConfig) -> int:
    """Steps kept in reserve for the checks after an estimate at `cfg`: the step-size check's
    over the same Langevin time at the next smaller step size, and the localisation check's
    chains, as long as the estimate's and relaxed at the lower γ (when that fits in
    `max_steps`)."""
    steps = 0
    if cal.discretisation_check:
        sizes = sorted(cal.step_sizes, reverse=True)
        ratio = max((a / b for a, b in zip(sizes, sizes[1:])), default=1.0)
        steps += cal.pilot_chains * math.ceil(cfg.n_steps * ratio)
    if cal.localisation_ratio is not None:
        low = replace(cfg, gamma=cfg.gamma / cal.localisation_ratio)
        need = max(cfg.n_steps, relaxation_steps(low, cal))
        steps += _check_chains(cal) * need if need <= cal.max_steps else 0
    return steps


def _smallest_step(cfg: SGLDConfig) -> float:
    """The smallest step any parameter takes (`step_size` times the smallest scale)."""
    return cfg.step_size * min((f for _, f in cfg.step_scales), default=1.0)


def relaxation_steps(cfg: SGLDConfig, cal: CalibrationConfig) -> int:
    """Steps per chain for `cal.min_relaxations` relaxation times of the localisation,
    `2/(εγ)` with ε the smallest step any parameter takes (0 without localisation)."""
    if cfg.gamma <= 0 or cal.min_relaxations == 0:
        return 0
    return math.ceil(cal.min_relaxations * 2 / (_smallest_step(cfg) * cfg.gamma))
