"""The study's sweep config (experiments/omniglot/study.py)."""
import os

import pytest

from gl_jax import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, "experiments", "omniglot", "study.py")


@pytest.mark.parametrize("regime", ["head_k4", "head_k9", "full_k4", "full_k9"])
def test_study_config_explores_then_compares_on_validation(regime):
    explore = sweep_lib.Sweep(f"{STUDY}:{regime}.explore", "/tmp/unused")
    full = sweep_lib.Sweep(f"{STUDY}:{regime}", "/tmp/unused")
    assert all(p in full.points for p in explore.points)
    assert full.root == explore.root          # both list the same runs
    k = int(regime[-1])
    for point in full.points:
        config = full.config(point)
        assert config.sampler.samples_per_class == k
        assert config.selection.protocol == "validation" and config.data.val_classes == 66
        # The test split: never in the exploration; in the final rows, whose settings
        # are fixed before they run; with --test for the final rows the exploration began.
        assert config.evals.final_test == (point not in explore.points)
        assert config.evals.every_epochs == config.schedule.epochs   # validated once, at the end
        assert (config.model.freeze_backbone, config.model.name == "efficientnet_lite0") == (
            (True, True) if regime.startswith("head") else (False, False))
    assert all(p in explore.points for p in full.test) and not explore.test
    final = [p for p in full.points if p not in explore.points]
    # Every final row has three seeds at both budgets, counting the explored seed 0.
    labels = [sweep_lib.row_label(p, full.module) for p in final + full.test]
    assert all(labels.count(label) == 3 for label in labels)
    assert len(set(labels)) == 2 * (1 + bool(full.module.CHOSEN) + len(full.module.BASELINES))
    assert len({full.workdir(p) for p in full.points}) == len(full.points)
