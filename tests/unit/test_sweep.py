"""Sweeps (core/sweep.py): the [sweep] table's validation, the expansion into variants, the halving
rule and the sweep's view. Real files under tmp_path for the validation, no mocks."""

from __future__ import annotations

import pytest

from oddaemon.core.evalbook import CheckpointEval, CheckpointState
from oddaemon.core.job_validation import ValidationContext, parse_job
from oddaemon.core.jobs import Job
from oddaemon.core.jobspec import JobSpec
from oddaemon.core.states import JobState
from oddaemon.core.sweep import Standing, expand, halving_stops, rung_value, sweep_view
from oddaemon.core.views import job_view


@pytest.fixture
def root(tmp_path):
    (tmp_path / "p.config").write_text("model {}\n")
    (tmp_path / "ckpt-0.index").write_text("x")
    return tmp_path


def parse(root, sweep: str, extra: str = ""):
    text = (f'name = "lr"\npipeline_config = "{root}/p.config"\nmodel_dir = "{root}/runs"\n{extra}\n'
            f"[sweep]\n{sweep}\n")
    return parse_job(text.encode(), "lr.toml", ValidationContext(allowed_roots=(str(root),)))


def messages(result) -> list[str]:
    assert isinstance(result, list), f"expected problems, got {result!r}"
    return [p.message for p in result]


def test_a_grid_becomes_named_variants_each_below_the_sweeps_model_dir(root):
    spec = parse(root, "values = { learning_rate_base = [0.01, 0.02], batch_size = [4, 8] }")
    variants = expand(spec)
    assert [v.name for v in variants] == ["lr-1", "lr-2", "lr-3", "lr-4"]
    assert [v.model_dir for v in variants] == [f"{root}/runs/lr-{i}" for i in range(1, 5)]
    assert [(v.pipeline.learning_rate_base, v.pipeline.batch_size) for v in variants] == [
        (0.01, 4), (0.01, 8), (0.02, 4), (0.02, 8)]
    assert variants[2].sweep.of == "lr" and variants[2].sweep.index == 3
    assert dict(variants[2].sweep.assigned) == {"learning_rate_base": 0.02, "batch_size": 4}
    # a variant survives its job record (JSON) unchanged
    assert JobSpec.from_dict(variants[1].to_dict()) == variants[1]


def test_a_random_sweep_draws_distinct_combinations_the_same_for_the_same_seed(root):
    table = "method = \"random\"\nsamples = 5\nseed = {}\nvalues = {{ learning_rate_base = [0.01, 0.02, 0.03, 0.04], " \
            "warmup_steps = [0, 10, 20] }}"
    first = [dict(v.sweep.assigned) for v in expand(parse(root, table.format(7)))]
    again = [dict(v.sweep.assigned) for v in expand(parse(root, table.format(7)))]
    other = [dict(v.sweep.assigned) for v in expand(parse(root, table.format(8)))]
    assert len(first) == 5 and first == again and first != other
    assert len({tuple(sorted(d.items())) for d in first}) == 5
    assert all(d["learning_rate_base"] in (0.01, 0.02, 0.03, 0.04) and d["warmup_steps"] in (0, 10, 20) for d in first)


@pytest.mark.parametrize(("sweep", "extra", "expected"), [
    ("method = \"grid\"", "", "[sweep] values: must be a table of [pipeline] keys"),
    ("values = { learning_rate_base = [0.01, -1] }", "",
     "[sweep] values.learning_rate_base[1]: must be a finite number > 0, got -1"),
    ("values = { batch_size = [4, 4] }", "", "[sweep] values.batch_size: 4 is listed twice"),
    ("values = { batch_size = [4] }", "[pipeline]\nbatch_size = 2", "[sweep] values.batch_size: is also set in [pipeline]"),
    ("values = { colour = [1] }", "", "[sweep] values.colour: 'colour' is not a [pipeline] key"),
    ("values = { train_input_path = [\"/x\"] }", "", "[sweep] values.train_input_path: 'train_input_path' is a list"),
    ("values = { fine_tune_checkpoint = [\"/nowhere/ckpt-0\"] }", "",
     "[sweep] values.fine_tune_checkpoint[0]: /nowhere/ckpt-0 is outside the allowed roots"),
    ("method = \"bayes\"\nvalues = { batch_size = [4] }", "", "[sweep] method: must be one of 'grid', 'random'"),
    ("method = \"random\"\nvalues = { batch_size = [4, 8] }", "", "[sweep] samples: is required"),
    ("method = \"random\"\nsamples = 2\nvalues = { batch_size = [4, 8] }", "",
     "[sweep] samples: 2 is not fewer than the 2 combinations"),
    ("values = { batch_size = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], num_steps = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] }", "",
     "[sweep] values: the grid has 110 combinations; a sweep has at most 100 variants"),
    ("values = { batch_size = [4] }\nhalving_steps = [20, 10]", "", "[sweep] halving_steps: must be a list"),
    ("values = { batch_size = [4] }\nhalving_steps = [10]", "[eval]\nenabled = false",
     "[sweep] halving_steps: needs evaluation"),
    ("values = { batch_size = [4] }\nhalving_steps = [10]\nkeep_fraction = 1.0", "",
     "[sweep] keep_fraction: must be a number between 0 and 1"),
    ("values = { batch_size = [4] }\nrungs = [10]", "", "unknown key 'rungs' in [sweep]"),
    ("values = { learning_rate_base = [0.01, 0.1] }", "[pipeline]\nwarmup_learning_rate = 0.05",
     "[sweep] variant lr-1 (learning_rate_base = 0.01): [pipeline] warmup_learning_rate: 0.05 is larger than "
     "learning_rate_base 0.01"),
])
def test_a_bad_sweep_is_rejected_naming_the_key(root, sweep, extra, expected):
    found = messages(parse(root, sweep, extra))
    assert any(m.startswith(expected) for m in found), found


def test_an_empty_sweep_table_is_no_sweep(root):
    spec = parse(root, "")
    assert isinstance(spec, JobSpec) and not spec.sweep.method and spec.name == "lr"


def test_a_sweep_whose_variant_names_would_be_too_long_is_rejected(root):
    text = (f'name = "{"n" * 63}"\npipeline_config = "{root}/p.config"\nmodel_dir = "{root}/runs"\n'
            "[sweep]\nvalues = { batch_size = [4, 8] }\n")
    found = messages(parse_job(text.encode(), "x.toml", ValidationContext(allowed_roots=(str(root),))))
    assert any("choose a shorter name" in m and f"{'n' * 63}-2" in m for m in found), found


def test_a_sweep_value_is_checked_as_its_pipeline_key_would_be(root):
    spec = parse(root, f'values = {{ fine_tune_checkpoint = ["{root}/ckpt-0"], fine_tune_checkpoint_type = '
                       '["detection", "full"] }')
    assert [v.pipeline.fine_tune_checkpoint_type for v in expand(spec)] == ["detection", "full"]
    assert "[sweep] values.fine_tune_checkpoint_type[1]: must be one of" in messages(parse(
        root, 'values = { fine_tune_checkpoint_type = ["detection", "everything"] }'))[0]


# ---- halving


def s(name, evaluations, active=True):
    return Standing(name, active, tuple(evaluations))


def test_the_rung_value_is_the_best_up_to_the_first_evaluation_at_or_after_the_rung():
    assert rung_value(((5, 0.1), (10, 0.3), (15, 0.2), (20, 0.9)), 12, True) == 0.3
    assert rung_value(((5, 0.1), (10, 0.3), (15, 0.2), (20, 0.9)), 12, False) == 0.1
    assert rung_value(((5, 0.1),), 12, True) is None


def test_one_variant_at_a_rung_decides_nothing_two_stop_the_worse():
    alone = [s("a-1", [(10, 0.1)]), s("a-2", [(5, 0.9)])]
    assert halving_stops("a", (10,), 0.5, True, "mAP", alone) == []
    two = [s("a-1", [(10, 0.1)]), s("a-2", [(10, 0.9)])]
    [(name, reason)] = halving_stops("a", (10,), 0.5, True, "mAP", two)
    assert name == "a-1"
    assert reason.startswith("sweep a: halving at step 10: mAP 0.1 is not among the best 1 of the 2 variants")


def test_the_bottom_fraction_stops_the_best_and_finished_ones_never():
    three = [s("b-1", [(10, 0.5)]), s("b-2", [(10, 0.2)]), s("b-3", [(10, 0.1)], active=False)]
    # keep ceil(0.5 * 3) = 2: b-3 is the worst but has finished already; b-2 is kept
    assert halving_stops("b", (10,), 0.5, True, "mAP", three) == []
    four = [*three, s("b-4", [(10, 0.3)])]  # keep 2 of 4: b-1, b-4; b-2 stops
    assert [n for n, _ in halving_stops("b", (10,), 0.5, True, "mAP", four)] == ["b-2"]
    # lower is better: the two highest go (b-3 and b-2 are the best two)
    assert [n for n, _ in halving_stops("b", (10,), 0.5, False, "loss", four)] == ["b-4", "b-1"]
    # the sweep's best variant is never stopped, even when a rung says so
    assert halving_stops("b", (10,), 0.5, True, "mAP", four, sweep_best="b-2") == []


def test_a_variant_is_judged_at_the_highest_rung_it_reached():
    # c-1 was behind at step 10 but is at step 20 now, where it leads: it goes on
    standings = [s("c-1", [(10, 0.1), (20, 0.8)]), s("c-2", [(10, 0.5)]), s("c-3", [(10, 0.4), (20, 0.6)])]
    stops = dict(halving_stops("c", (10, 20), 0.5, True, "mAP", standings))
    # at 10: keep c-2, c-3 (2 of 3); at 20: keep c-1, c-3 is stopped there
    assert list(stops) == ["c-3"] and "halving at step 20" in stops["c-3"]


# ---- the view


def variant_job(spec, state="running"):
    return Job(name=spec.name, seq=spec.sweep.index, spec=spec, wants=0, state=JobState(state))


class Book:
    """Just what evaluation_view reads of a book with one evaluated best checkpoint."""

    def __init__(self, value, step):
        self.best_n = 1
        self._c = CheckpointEval(1, "/p", 0.0, CheckpointState.DONE, step, {"DetectionBoxes_Precision/mAP": value})
        self.released, self.last_released_why, self.newest_completed_at, self.newest_step = 0, "", 0.0, step
        self.checkpoints = {1: self._c}

    def best(self):
        return self._c

    def latest_done(self):
        return self._c

    def counts(self):
        return {"evaluated": 1}

    def recent(self, limit):
        return [self._c][:limit]


def test_the_sweep_view_names_the_best_variant_with_its_values_step_and_export(root):
    spec = parse(root, "values = { learning_rate_base = [0.01, 0.02, 0.04] }", "[eval]\nexport_best = true")
    variants = expand(spec)
    views = [job_view(variant_job(variants[0], "succeeded"), None, None, "/l", Book(0.2, 30), 0),
             job_view(variant_job(variants[1], "running"), None, None, "/l", Book(0.4, 20), 0),
             job_view(variant_job(variants[2], "queued"), None, None, "/l", None, 0)]
    view = sweep_view("lr", views)
    assert view["state"] == "running" and view["variants"] == 3 and view["keys"] == ["learning_rate_base"]
    assert view["best"]["name"] == "lr-2" and view["best"]["value"] == 0.4 and view["best"]["step"] == 20
    assert view["best"]["exported"] == f"{root}/runs/lr-2/exported"
    assert [r["values"]["learning_rate_base"] for r in view["rows"]] == [0.01, 0.02, 0.04]
    assert [r["best"] for r in view["rows"]] == [False, True, False]
    assert [r["state"] for r in view["rows"]] == ["succeeded", "running", "queued"]
    assert view["model_dir"] == f"{root}/runs"
