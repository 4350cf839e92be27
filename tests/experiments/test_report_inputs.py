"""`tl-degeneracy report` (and `Study.load`) on edited JSON files of a saved study: each
refused as one line naming the file and the entry (`Study.load`, `load_report_views`), not a
raw traceback."""

from __future__ import annotations

import json

import pytest

from tl_degeneracy import cli
from tl_degeneracy.experiments.study import Study
from tl_degeneracy.experiments.study_output import load_study_artifacts
from tl_degeneracy.viz.report_artifacts import load_report_views

SITE = "blocks.0.hook_resid_pre"
EXAMPLE = {"values": [[1.0]], "seq_idx": [[0]], "pos_idx": [[0]], "tokens": [[["a"]]],
           "acts": [[[1.0]]], "center": [[0]], "feature_ids": [0]}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("examples_lib.json", [1, 2, 3], ": is a list ([1, 2, 3]), expected an object"),
        ("examples_lib.json", {SITE: {**EXAMPLE, "feature_ids": "abc"}}, '["feature_ids"]: is a'),
        ("examples_lib.json", {SITE: {**EXAMPLE, "feature_ids": [0, 1]}}, "2 feature ids for 1"),
        ("logit_effects_lib.json", {SITE: 5}, f'["{SITE}"]: is a number (5), expected an object'),
        ("diagnostic.json", {"threshold": "high", "shares": {}}, '["threshold"]: is a string'),
        ("diagnostic.json", {"threshold": 0.5, "shares": "x"}, '["shares"]: is a string'),
    ],
)
def test_damaged_views_name_the_file_and_entry(tmp_path, name, content, where):
    (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(ValueError) as caught:
        load_report_views(tmp_path, ["lib"])
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / name}: ") and where in message
    assert "delete the file" in message


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        ({"config": [1]}, '["config"]: is a list ([1]), expected an object'),
        ({"curves": "none"}, '["curves"]: is a string'),
        ({"config": {"bogus": 1}}, '["config"]["bogus"]: is not a setting (StudyConfig has'),
    ],
)
def test_a_damaged_study_json_names_the_entry(tmp_path, capsys, edit, where):
    record = {"config": {}, "timings_s": {}, "n_tokens": 1, "jacobian_errors": {},
              "used_store": False, "curves": []}  # fmt: skip
    (tmp_path / "study.json").write_text(json.dumps({**record, **edit}))
    for load in (load_study_artifacts, Study.load):  # the report, and Python
        with pytest.raises(ValueError, match="study.json: ") as caught:
            load(tmp_path)
        assert where in str(caught.value)
    (tmp_path / "summary.json").write_text("{}")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{tmp_path / 'study.json'}: " in err
