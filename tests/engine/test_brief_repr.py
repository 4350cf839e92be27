"""Results print what they hold (shapes, counts, headline numbers), never their tensors'
values, traces or metadata: `print(result)` in a notebook stays a line or two."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import warnings

import torch

import tl_degeneracy.engine as engine
from tl_degeneracy.engine.artifacts import Result
from tl_degeneracy.engine.brief_repr import BriefRepr, brief
from tl_degeneracy.engine.degeneracy import SGLDConfig, SGLDWarning, estimate_llc
from tl_degeneracy.engine.degeneracy.ground_truth import linear_regression_problem
from tl_degeneracy.engine.degeneracy.report import SectionReport


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


def _import_engine() -> None:
    for info in pkgutil.walk_packages(engine.__path__, engine.__name__ + "."):
        importlib.import_module(info.name)


def test_no_result_prints_with_the_dataclass_repr():
    """A dataclass's generated repr prints every tensor in full; every result class and every
    `BriefRepr` class replaces it (declared `@dataclass(repr=False)` or with its own)."""
    _import_engine()
    classes = _all_subclasses(Result) | _all_subclasses(BriefRepr)
    assert len(classes) >= 20
    generated = [
        c.__name__
        for c in classes
        if dataclasses.is_dataclass(c) and "__create_fn__" in c.__repr__.__qualname__
    ]
    assert not generated, f"these print every field in full: {generated}"


def test_an_llc_estimate_prints_its_numbers_not_its_traces():
    config = SGLDConfig(step_size=1e-4, n_steps=300, n_burnin=100, n_chains=3, batch_size=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SGLDWarning)
        result = estimate_llc(linear_regression_problem(2, 200), config)
    text = repr(result)
    assert text.startswith("LLCResult(llc=") and f"llc={result.llc:.4g}" in text
    assert "loss_traces=tensor[3, 300] float" in text
    assert "tensor([" not in text and len(text) < 600
    section = repr(SectionReport("mlp", 10, {}, 8, torch.zeros(1, dtype=torch.int64), result))
    assert section.startswith("SectionReport(name='mlp'") and "tensor([" not in section


def test_brief_names_shapes_counts_and_numbers():
    assert brief(torch.zeros(3, 4, dtype=torch.float64)) == "tensor[3, 4] float64"
    assert brief(torch.tensor(2.5)) == "2.5"
    assert brief(1 / 3) == "0.3333"
    assert brief(float("nan")) == "nan"
    assert brief({"a": torch.zeros(2)}) == "{'a': tensor[2] float32}"
    assert brief({i: i for i in range(10)}) == "{10 entries}"
    assert brief(list(range(100))) == "[100 ints]"
    assert brief((1, 2)) == "(1, 2)"
