"""`experiments.study.StudyConfig`: a setting out of range is named when the config is made."""

from __future__ import annotations

import pytest

from tl_degeneracy.experiments.study import StudyConfig


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"kinds": ("lib", "ib")}, "kinds must be lib and/or pca; got 'ib'"),
        ({"batch_rows": 0}, "batch_rows must be at least 1, got 0"),
        ({"store": "ram"}, "store must be one of auto, memory, disk, off; got 'ram'"),
        ({"final_basis": "ica"}, "final_basis must be one of raw, pca; got 'ica'"),
        ({"edge_tokens": -1}, "edge_tokens must be 0 \\(skip\\) or more, got -1"),
        ({"edge_outputs": 0}, "edge_outputs must be at least 1 \\(None: all\\), got 0"),
        ({"stats_device": "gpu"}, "'gpu' is not a device"),
    ],
)
def test_a_setting_out_of_range_is_named(setting, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig(**setting)
    StudyConfig(edge_tokens=0, ablation_tokens=0, edge_outputs=None, kinds=("pca",))  # all fine
