"""One verdict per check: a property made of several checks in sequence runs every one of them, so that one failure
never hides another, and reports each (the `checks` of its verify row: name, status, detail).

    ck = Checks()
    with ck("both_active"):
        worst = max(worst, _close(...))
    with ck("switch_back"):
        require(...)
    return ck.done(worst)

A check that fails (an AssertionError, e.g. harness.probes.Falsified) or crashes (any other Exception) is recorded
and the next check runs. `done` then re-raises the first failure as it was raised, so the property's own verdict,
detail and failure kind are the ones it had when it stopped at its first failure; the exception carries every
check's outcome in `.checks`. A passing property returns its worst error as a `Measured` float carrying them.
harness.engine.run_property turns them into the row's `checks` (a check that failed on any example fails).

Later checks run on the state the earlier ones left: after a crash, a later failure may be a consequence of it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Outcome:
    """One check on one example: `error` is None when it held, else the exception it raised."""
    name: str
    error: BaseException | None = None


class Measured(float):
    """A property's worst error (a float) with the outcome of each of its checks."""
    checks: list[Outcome]

    def __new__(cls, value: float, checks: list[Outcome]):
        out = super().__new__(cls, value)
        out.checks = list(checks)
        return out

    def __reduce__(self):  # copied or pickled, it is the plain number (the outcomes hold live exceptions)
        return (float, (float(self),))


class Checks:
    """The checks of one example of a property, each run whatever happened to the others."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    @contextmanager
    def __call__(self, name: str):
        if any(o.name == name for o in self.outcomes):
            raise ValueError(f"check {name!r} is run twice in one example: check names must be unique")
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a failed or crashed check is recorded; the next one runs
            self.outcomes.append(Outcome(name, e))
        else:
            self.outcomes.append(Outcome(name))

    def done(self, worst: float | None) -> Measured | None:
        """The worst error with every check's outcome, or the first failure re-raised (carrying them)."""
        first = next((o.error for o in self.outcomes if o.error is not None), None)
        if first is not None:
            first.checks = list(self.outcomes)  # type: ignore[attr-defined]
            raise first
        return None if worst is None else Measured(worst, self.outcomes)


def outcomes_of(obj) -> list[Outcome] | None:
    """The check outcomes a property's return value or exception carries, if any."""
    return getattr(obj, "checks", None)
