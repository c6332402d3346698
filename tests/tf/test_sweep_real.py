"""A sweep of three tiny real TF jobs through the real daemon: each variant trains with its own
learning rate in its own model_dir, is evaluated and exports its best, and `oddaemon sweep` names
the best variant with its exported SavedModel."""

from __future__ import annotations

import json
import os

import pytest

from tests.support.realtf import REAL_TF, tiny_job

pytestmark = [*REAL_TF, pytest.mark.timeout(1800)]

MAP = "DetectionBoxes_Precision/mAP"
RATES = (0.01, 0.04, 0.08)


def test_a_sweep_of_three_real_jobs_names_the_best_variant_and_its_export(real_env):
    env = real_env
    tiny_job(env, "tfs", "num_steps = 6", "checkpoint_max_to_keep = 2",
             'device = "cpu"\nexport_best = true\n\n[sweep]\n'
             f"values = {{ learning_rate_base = [{', '.join(map(str, RATES))}] }}")
    finals = [env.wait_state(f"tfs-{i}", ("succeeded", "failed", "cancelled"), 1500) for i in (1, 2, 3)]
    assert [f["state"] for f in finals] == ["succeeded"] * 3, ([f["reason"] for f in finals], env.daemon_log()[-4000:])
    for i, final in enumerate(finals, start=1):
        assert final["model_dir"] == os.path.join(env.models, "tfs", f"tfs-{i}")
        assert final["sweep"]["values"] == {"learning_rate_base": RATES[i - 1]}
        assert any(n.endswith(".index") for n in os.listdir(final["model_dir"]))
    # the real trainer ran each variant at its own rate (TF's own learning_rate scalar, same schedule)
    rates = [f["learning_rate"] for f in finals]
    assert None not in rates and rates[0] < rates[1] < rates[2], rates
    # the best variant by the jobs' own best values, worked out here (ties go to the lower index)
    values = [f["evaluation"]["best"]["value"] for f in finals]
    expected = f"tfs-{values.index(max(values)) + 1}"
    shown = json.loads(env.cli("sweep", "tfs", "--json").stdout)
    assert shown["state"] == "succeeded" and shown["best"]["name"] == expected
    assert shown["best"]["value"] == max(values)
    exported = shown["best"]["exported"]
    assert exported == os.path.join(env.models, "tfs", expected, "exported")
    info = json.load(open(os.path.join(exported, "export.json")))
    best = finals[int(expected.rsplit("-", 1)[1]) - 1]["evaluation"]["best"]
    assert (info["checkpoint"], info["step"]) == (best["checkpoint"], best["step"])
    assert os.path.exists(os.path.join(exported, "saved_model.pb"))  # the directory is the SavedModel
