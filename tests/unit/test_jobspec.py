"""Job spec v1: parsing, validation messages, round trips. Real files under tmp_path, no mocks."""

from __future__ import annotations

import json
import math
import pathlib
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oddaemon.core.checks import Problem, render_error_file
from oddaemon.core.job_validation import ValidationContext, parse_job
from oddaemon.core.jobspec import ALLOWED_KEYS, EvalOptions, JobSpec, PipelineEdits, TrainOptions, gpu_count

REPO = pathlib.Path(__file__).resolve().parents[2]

BASE = 'pipeline_config = "@R/models/effdet/pipeline.config"\nmodel_dir = "@R/runs/m1"\n'


@pytest.fixture
def tree(tmp_path):
    """An allowed root with a model, checkpoint, label map and data, plus a directory outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for rel in ("models/effdet/pipeline.config", "models/effdet/checkpoint/ckpt-0.index",
                "data/label_map.pbtxt", "data/train-0.tfrecord", "data/train-1.tfrecord",
                "data/eval.tfrecord", "afile"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / "runs").mkdir()
    outside.mkdir()
    (outside / "secret.config").write_text("x")
    (root / "link").symlink_to(outside)
    return root, outside


@pytest.fixture
def ctx(tree):
    return ValidationContext(allowed_roots=(str(tree[0]),))


def expand(text: str, tree) -> bytes:
    root, outside = tree
    return text.replace("@R", str(root)).replace("@O", str(outside)).replace("@T", str(root.parent)).encode()


def parse(text: str, tree, ctx, filename: str = "job.toml"):
    return parse_job(expand(text, tree), filename, ctx)


def rendered(result) -> str:
    assert isinstance(result, list), f"expected problems, got {result!r}"
    assert result and all(isinstance(p, Problem) and p.message for p in result)
    return "\n".join(p.render() for p in result)


BAD_TEXT = [
    ("syntax-error", 'name = "a"\npriority = = 3\n', "line 2, column 12: TOML syntax error: invalid value"),
    ("syntax-two-values", 'a = 1\nb = 2 3\n', "line 2, column 7: TOML syntax error: expected newline"),
    ("syntax-duplicate-table", BASE + "[train]\n[train]\n", "TOML syntax error: cannot declare 'train' twice"),
    ("syntax-at-end", "name = ", "line 1, column 8: TOML syntax error: invalid value"),
    ("syntax-deep-nesting", "a = " + "[" * 5000, "nested too deeply"),
    ("syntax-huge-integer", "priority = " + "9" * 5000, "TOML syntax error: a number has more than 4300 digits"),
    # Hex literals have no digit limit in Python: the value must still be shown, and bounded.
    ("huge-hex-integer", BASE + "priority = 0x" + "f" * 5000,
     "priority: must be a whole number from -1000 to 1000, got a whole number of about 6021 digits"),
    ("huge-hex-num-steps", BASE + "[pipeline]\nnum_steps = 0x" + "f" * 5000,
     "[pipeline] num_steps: must be a whole number from 1 to 2147483647, got a whole number of about 6021 digits"),
    ("num-steps-over-int32", BASE + "[pipeline]\nnum_steps = 2147483648\n",
     "[pipeline] num_steps: must be a whole number from 1 to 2147483647, got 2147483648"),
    ("huge-warmup-steps", BASE + "[pipeline]\nwarmup_steps = 0x" + "f" * 5000 + "\ntotal_steps = 5\n",
     "[pipeline] warmup_steps: must be a whole number from 0 to 2147483647"),
    ("path-too-long", 'pipeline_config = "@R/models/effdet/pipeline.config"\nmodel_dir = "@R/' + "a" * 5000 + '"\n',
     "bytes long; a path can be at most 4095 bytes"),
    ("glob-too-deep", BASE + '[pipeline]\ntrain_input_path = "@R' + "/*" * 2000 + '"\n',
     "has 2000 path components with wildcards (* ? [); at most 32 are allowed"),
    ("unknown-top-key", "priorty = 1\n" + BASE,
     "unknown key 'priorty' at the top level; did you mean 'priority'? Allowed keys: name, pipeline_config"),
    ("unknown-top-key-no-match", "zzz = 1\n" + BASE, "unknown key 'zzz' at the top level. Allowed keys: name"),
    ("unknown-table", BASE + "[trian]\ngpus = 1\n", "unknown table [trian]; did you mean [train]?"),
    ("unknown-table-no-match", BASE + "[xyz]\n", "unknown table [xyz]. Allowed tables: [pipeline], [train], [eval]"),
    ("unknown-pipeline-key", BASE + "[pipeline]\nnum_clases = 3\n",
     "unknown key 'num_clases' in [pipeline]; did you mean 'num_classes'? Allowed keys: num_classes, batch_size"),
    ("unknown-train-key", BASE + "[train]\ncheckpoint_every = 5\n",
     "unknown key 'checkpoint_every' in [train]; did you mean 'checkpoint_every_n'?"),
    ("unknown-eval-key", BASE + "[eval]\ndevise = 'cpu'\n", "unknown key 'devise' in [eval]; did you mean 'device'?"),
    ("unknown-eval-key-no-match", BASE + "[eval]\nzzz = 1\n",
     "unknown key 'zzz' in [eval]. Allowed keys: enabled, device, sample_1_of_n_eval_examples, metric"),
    ("string-for-int", BASE + "[pipeline]\nnum_classes = '3'\n",
     "[pipeline] num_classes: must be a whole number from 1 to 100000, got '3'"),
    ("bool-for-int", BASE + "[pipeline]\nbatch_size = true\n",
     "[pipeline] batch_size: must be a whole number from 1 to 65536, got true"),
    ("float-for-int", BASE + "[pipeline]\nnum_steps = 2.5\n", "[pipeline] num_steps: must be a whole number from 1 to 2147483647, got 2.5"),
    ("bool-for-float", BASE + "[pipeline]\nlearning_rate_base = true\n",
     "[pipeline] learning_rate_base: must be a finite number > 0, got true"),
    ("list-of-bools-gpus", BASE + "[train]\ngpus = [true, false]\n",
     "[train] gpus: GPU ids must be whole numbers from 0 to 63, got true"),
    ("list-of-bools-inputs", BASE + "[pipeline]\ntrain_input_path = [true, false]\n",
     "[pipeline] train_input_path[1]: must be a string (an absolute path), got false"),
    ("table-for-value", BASE + "[pipeline.num_classes]\na = 1\n", "[pipeline] num_classes: must be a whole number from 1 "
     "to 100000, got a table"),
    ("train-not-a-table", 'train = "gpu"\n' + BASE, "train: must be a table written as a [train] section, got 'gpu'"),
    ("pipeline-array-of-tables", BASE + "[[pipeline]]\n", "pipeline: must be a table written as a [pipeline] section"),
    ("priority-high", "priority = 1001\n" + BASE, "priority: must be a whole number from -1000 to 1000, got 1001"),
    ("priority-low", "priority = -1001\n" + BASE, "got -1001"),
    ("num-classes-zero", BASE + "[pipeline]\nnum_classes = 0\n", "[pipeline] num_classes: must be a whole number from 1"),
    ("batch-too-big", BASE + "[pipeline]\nbatch_size = 65537\n", "from 1 to 65536, got 65537"),
    ("num-steps-zero", BASE + "[pipeline]\nnum_steps = 0\n", "[pipeline] num_steps: must be a whole number from 1 to 2147483647, got 0"),
    ("total-steps-zero", BASE + "[pipeline]\ntotal_steps = 0\n", "[pipeline] total_steps: must be a whole number from 1 to 2147483647, got 0"),
    ("warmup-steps-negative", BASE + "[pipeline]\nwarmup_steps = -1\n", "[pipeline] warmup_steps: must be a whole number from 0 to 2147483647, got -1"),
    ("lr-zero", BASE + "[pipeline]\nlearning_rate_base = 0\n", "learning_rate_base: must be a finite number > 0, got 0"),
    ("lr-nan", BASE + "[pipeline]\nlearning_rate_base = nan\n", "learning_rate_base: must be a finite number > 0, got nan"),
    ("lr-inf", BASE + "[pipeline]\nlearning_rate_base = inf\n", "got inf"),
    ("lr-huge-int", BASE + "[pipeline]\nlearning_rate_base = " + "9" * 400 + "\n", "must be a finite number > 0, got 999"),
    ("warmup-lr-negative", BASE + "[pipeline]\nwarmup_learning_rate = -0.1\n",
     "[pipeline] warmup_learning_rate: must be a finite number >= 0, got -0.1"),
    ("warmup-after-total", BASE + "[pipeline]\nwarmup_steps = 2000\ntotal_steps = 1000\n",
     "[pipeline] warmup_steps: 2000 is larger than total_steps 1000"),
    ("warmup-lr-above-base", BASE + "[pipeline]\nwarmup_learning_rate = 0.1\nlearning_rate_base = 0.01\n",
     "[pipeline] warmup_learning_rate: 0.1 is larger than learning_rate_base 0.01"),
    ("checkpoint-type", BASE + "[pipeline]\nfine_tune_checkpoint_type = 'detect'\n",
     "fine_tune_checkpoint_type: must be one of 'detection', 'classification', 'fine_tune', 'full', got 'detect'"),
    ("gpus-too-many", BASE + "[train]\ngpus = 65\n", "[train] gpus: must be a whole number from 0 to 64"),
    ("gpus-word", BASE + "[train]\ngpus = 'two'\n", "a list of GPU ids or \"auto\", got 'two'"),
    ("gpus-empty-list", BASE + "[train]\ngpus = []\n", "[train] gpus: must not be an empty list"),
    ("gpu-id-too-big", BASE + "[train]\ngpus = [64]\n", "GPU ids must be whole numbers from 0 to 63, got 64"),
    ("gpu-id-twice", BASE + "[train]\ngpus = [1, 3, 3]\n", "[train] gpus: GPU id 3 is listed twice"),
    ("checkpoint-every-zero", BASE + "[train]\ncheckpoint_every_n = 0\n",
     "[train] checkpoint_every_n: must be a whole number from 1 to 1000000000, got 0"),
    ("max-to-keep", BASE + "[train]\ncheckpoint_max_to_keep = 10001\n", "checkpoint_max_to_keep: must be a whole number "
     "from 1 to 10000"),
    ("max-restarts", BASE + "[train]\nmax_restarts = -1\n", "[train] max_restarts: must be a whole number from 0 to 1000"),
    ("eval-device", BASE + "[eval]\ndevice = 'tpu'\n", "[eval] device: must be one of 'cpu', 'gpu', 'auto', got 'tpu'"),
    ("eval-enabled-string", BASE + "[eval]\nenabled = 'yes'\n", "[eval] enabled: must be true or false, got 'yes'"),
    ("eval-sample-zero", BASE + "[eval]\nsample_1_of_n_eval_examples = 0\n",
     "[eval] sample_1_of_n_eval_examples: must be a whole number from 1 to 2147483647, got 0"),
    ("eval-patience-zero", BASE + "[eval]\npatience = 0\n",
     "[eval] patience: must be a whole number from 1 to 10000, got 0"),
    ("eval-when-behind", BASE + "[eval]\nwhen_behind = \"skip\"\n",
     "[eval] when_behind: must be one of 'evaluate_all', 'skip_to_newest', got 'skip'"),
    ("eval-min-delta-negative", BASE + "[eval]\nmin_delta = -0.1\n",
     "[eval] min_delta: must be a finite number >= 0, got -0.1"),
    ("eval-metric-odd-chars", BASE + "[eval]\nmetric = \"mAP; rm -rf /\"\n",
     "[eval] metric: must be a metric name such as 'DetectionBoxes_Precision/mAP'"),
    ("eval-export-best-string", BASE + "[eval]\nexport_best = \"yes\"\n",
     "[eval] export_best: must be true or false, got 'yes'"),
    ("batch-not-divisible", BASE + "[pipeline]\nbatch_size = 10\n[train]\ngpus = [0, 1, 2]\n",
     "[pipeline] batch_size: 10 is not divisible by the 3 GPU(s)"),
    ("batch-not-divisible-count", BASE + "[pipeline]\nbatch_size = 9\n[train]\ngpus = 2\n", "not divisible by the 2 GPU(s)"),
    ("name-slash", 'name = "a/b"\n' + BASE, "name: not a valid job name: 'a/b' contains '/', which is not allowed"),
    ("name-dotdot", 'name = "a..b"\n' + BASE, "name: not a valid job name: 'a..b' contains '..'"),
    ("name-too-long", f'name = "{"a" * 65}"\n' + BASE, "is 65 characters long, the maximum is 64"),
    ("name-leading-dot", 'name = ".hidden"\n' + BASE, "'.hidden' does not start with a letter or digit"),
    ("name-empty", 'name = ""\n' + BASE, "name: not a valid job name: it is empty; a job name is 1 to 64 characters"),
    ("name-not-string", "name = 3\n" + BASE, "name: must be a string, got 3"),
    ("relative-path", 'pipeline_config = "@R/models/effdet/pipeline.config"\nmodel_dir = "runs/m1"\n',
     "model_dir: must be an absolute path, got 'runs/m1'"),
    ("outside-via-dotdot", 'pipeline_config = "@R/../outside/secret.config"\nmodel_dir = "@R/runs/m1"\n',
     "pipeline_config: @R/../outside/secret.config resolves to @O/secret.config, which is outside the allowed roots @R"),
    ("outside-via-symlink", 'pipeline_config = "@R/link/secret.config"\nmodel_dir = "@R/runs/m1"\n',
     "pipeline_config: @R/link/secret.config resolves to @O/secret.config, which is outside the allowed roots @R"),
    ("outside-plain", 'pipeline_config = "@O/secret.config"\nmodel_dir = "@R/runs/m1"\n',
     "pipeline_config: @O/secret.config is outside the allowed roots @R"),
    ("model-dir-outside-via-symlink", 'pipeline_config = "@R/models/effdet/pipeline.config"\nmodel_dir = "@R/link/new"\n',
     "model_dir: @R/link/new resolves to @O/new, which is outside the allowed roots"),
    ("outside-via-symlink-then-dotdot", 'pipeline_config = "@R/models/effdet/pipeline.config"\nmodel_dir = "@R/link/../x"\n',
     "model_dir: @R/link/../x resolves to @T/x, which is outside the allowed roots @R"),
    ("pipeline-config-missing-file", 'pipeline_config = "@R/models/nope.config"\nmodel_dir = "@R/runs/m1"\n',
     "pipeline_config: @R/models/nope.config does not exist"),
    ("pipeline-config-is-dir", 'pipeline_config = "@R/models"\nmodel_dir = "@R/runs/m1"\n',
     "pipeline_config: @R/models is a directory, not a file"),
    ("missing-pipeline-config", 'model_dir = "@R/runs/m1"\n', "missing required key 'pipeline_config'"),
    ("missing-model-dir", 'pipeline_config = "@R/models/effdet/pipeline.config"\n', "missing required key 'model_dir'"),
    ("path-not-string", 'pipeline_config = 5\nmodel_dir = "@R/runs/m1"\n', "pipeline_config: must be a string (an absolute "
     "path), got 5"),
    ("path-with-nul", BASE + '[pipeline]\nlabel_map_path = "@R/data/x\\u0000y"\n', "must not contain a NUL character"),
    ("checkpoint-missing-index", BASE + '[pipeline]\nfine_tune_checkpoint = "@R/models/effdet/checkpoint"\n',
     "[pipeline] fine_tune_checkpoint: @R/models/effdet/checkpoint.index does not exist (give the checkpoint prefix, "
     "e.g. .../checkpoint/ckpt-0); for a checkpoint that another job is to write (e.g. its "
     "exported/checkpoint/ckpt-0), name that job in after"),
    ("label-map-missing", BASE + '[pipeline]\nlabel_map_path = "@R/data/labels.pbtxt"\n',
     "[pipeline] label_map_path: @R/data/labels.pbtxt does not exist"),
    ("glob-matches-nothing", BASE + '[pipeline]\ntrain_input_path = "@R/data/*.nothing"\n',
     "[pipeline] train_input_path: @R/data/*.nothing matches no file"),
    ("glob-matches-only-dirs", BASE + '[pipeline]\neval_input_path = ["@R/data/eval.tfrecord", "@R/mod*"]\n',
     "[pipeline] eval_input_path[1]: @R/mod* matches no file"),
    ("glob-match-outside-via-symlink", BASE + '[pipeline]\neval_input_path = "@R/*/secret.config"\n',
     "eval_input_path: @R/*/secret.config matches @R/link/secret.config, which resolves to @O/secret.config, outside"),
    ("input-relative", BASE + '[pipeline]\ntrain_input_path = ["data/*.tfrecord"]\n',
     "[pipeline] train_input_path[0]: must be an absolute path, got 'data/*.tfrecord'"),
    ("input-empty-string", BASE + '[pipeline]\ntrain_input_path = [""]\n', "train_input_path[0]: must not be empty"),
    ("input-empty-list", BASE + "[pipeline]\ntrain_input_path = []\n",
     "[pipeline] train_input_path: must be a path (glob) or a list of 1 to 1000 paths, got a list of 0 entries"),
    ("input-too-many", BASE + "[pipeline]\ntrain_input_path = [" + ", ".join(['"@R/data/eval.tfrecord"'] * 1001) + "]\n",
     "got a list of 1001 entries"),
    ("input-number", BASE + "[pipeline]\neval_input_path = 3\n", "[pipeline] eval_input_path: must be a path (glob)"),
    ("model-dir-is-file", 'pipeline_config = "@R/models/effdet/pipeline.config"\nmodel_dir = "@R/afile"\n',
     "model_dir: @R/afile exists and is a file; model_dir must be a directory"),
]


@pytest.mark.parametrize("text, fragment", [c[1:] for c in BAD_TEXT], ids=[c[0] for c in BAD_TEXT])
def test_bad_job_is_rejected_with_a_clear_problem(text, fragment, tree, ctx):
    assert expand(fragment, tree).decode() in rendered(parse(text, tree, ctx))


BAD_BYTES = [
    ("non-utf8", b'name = "caf\xe9"\n', "line 1, column 12: byte 0xe9 at offset 11 is not valid UTF-8"),
    ("non-utf8-line-3", b'a = 1\nb = 2\nc = "\xff"\n', "line 3, column 6: byte 0xff at offset 17"),
    ("nul-byte", b'name = "a"\n\x00', "line 2, column 1: NUL byte at offset 11"),
]


@pytest.mark.parametrize("data, fragment", [c[1:] for c in BAD_BYTES], ids=[c[0] for c in BAD_BYTES])
def test_bad_bytes_are_rejected(data, fragment, ctx):
    assert fragment in rendered(parse_job(data, "job.toml", ctx))


def test_oversized_file_names_size_and_cap(tree):
    small = ValidationContext(allowed_roots=(str(tree[0]),), max_file_bytes=100)
    problems = parse_job(b"#" * 101, "big.toml", small)
    assert rendered(problems).startswith("the file is 101 bytes, larger than the limit of 100 bytes")
    assert len(problems) == 1


def test_problem_keys_and_syntax_position(tree, ctx):
    [problem] = parse(BASE + "[pipeline]\nnum_classes = 0\n", tree, ctx)
    assert (problem.key, problem.line) == ("pipeline.num_classes", None)
    [problem] = parse('a = 1\nb = 2 3\n', tree, ctx)
    assert (problem.line, problem.column, problem.key) == (2, 7, None)
    [problem] = parse(BASE + '[pipeline]\ntrain_input_path = ["@R/x", "@R/data/eval.tfrecord"]\n', tree, ctx)
    assert problem.key == "pipeline.train_input_path"


def test_every_problem_is_reported_together(tree, ctx):
    text = ('name = "a/b"\npriority = 5000\nmodel_dir = "rel"\ncolour = 1\n'
            "[pipeline]\nnum_clases = 2\nbatch_size = true\nwarmup_steps = 10\ntotal_steps = 5\n"
            "[train]\ngpus = [0, 0]\n[eval]\ndevice = 'tpu'\n")
    problems = parse(text, tree, ctx)
    assert {p.key for p in problems} == {"name", "priority", "model_dir", "colour", "pipeline.num_clases",
                                         "pipeline.batch_size", "pipeline.warmup_steps", "train.gpus", "eval.device",
                                         "pipeline_config"}
    assert len(problems) == 10
    assert "missing required key 'pipeline_config'" in rendered(problems)


def test_problems_are_capped_so_a_file_cannot_make_a_huge_error_file(tree, ctx):
    text = BASE + "".join(f"k{i:x} = 1\n" for i in range(80_000))
    problems = parse(text, tree, ctx)
    assert len(problems) == 51 and problems[0].message.startswith("unknown key 'k0' at the top level")
    assert problems[-1].message.startswith("... and 79950 more problems not listed here (at most 50 are)")
    assert len(render_error_file("many.toml", problems)) < 20_000


def test_default_name_from_an_invalid_file_name(tree, ctx):
    text = rendered(parse(BASE, tree, ctx, filename="/spool/new/my job.toml"))
    assert "name: the job name defaults to the file name, which is not a valid job name: 'my job' contains ' '" in text
    assert 'set name = "..." in the file or rename it' in text


def test_model_dir_whose_existing_ancestor_is_outside_the_roots(tree):
    root = tree[0]
    missing_root = ValidationContext(allowed_roots=(str(root / "models"), str(root / "nothere")))
    text = 'pipeline_config = "@R/models/effdet/pipeline.config"\nmodel_dir = "@R/nothere/m1"\n'
    assert expand("its nearest existing parent directory @R is outside the allowed roots", tree).decode() in \
        rendered(parse(text, tree, missing_root))


def test_no_allowed_roots_configured(tree):
    text = rendered(parse(BASE, tree, ValidationContext(allowed_roots=())))
    assert "outside the allowed roots (none are configured)" in text


def test_minimal_job(tree, ctx):
    spec = parse(BASE, tree, ctx, filename="/spool/new/widgets-1.toml")
    root = str(tree[0])
    assert spec == JobSpec(name="widgets-1", pipeline_config=f"{root}/models/effdet/pipeline.config",
                           model_dir=f"{root}/runs/m1")
    assert spec.pipeline == PipelineEdits() and spec.train == TrainOptions() and spec.eval == EvalOptions()
    assert (spec.train.checkpoint_every_n, spec.train.checkpoint_max_to_keep, spec.eval.device) == (1000, 7, "cpu")


def test_name_defaults_to_the_file_stem_without_toml(tree, ctx):
    assert parse(BASE, tree, ctx, filename="a.b-c_1.toml").name == "a.b-c_1"
    assert parse(BASE, tree, ctx, filename="plain").name == "plain"
    assert parse('name = "given"\n' + BASE, tree, ctx, filename="x.toml").name == "given"


def test_input_paths_as_string_or_list(tree, ctx):
    text = BASE + ('[pipeline]\ntrain_input_path = "@R/data/train-*.tfrecord"\n'
                   'eval_input_path = ["@R/data/eval.tfrecord", "@R/data/train-?.tfrecord"]\n')
    spec = parse(text, tree, ctx)
    root = str(tree[0])
    assert spec.pipeline.train_input_path == (f"{root}/data/train-*.tfrecord",)
    assert spec.pipeline.eval_input_path == (f"{root}/data/eval.tfrecord", f"{root}/data/train-?.tfrecord")


def test_model_dir_may_be_an_existing_directory_or_new_nested_one(tree, ctx):
    for model_dir in ("@R/runs", "@R/runs/a/b/c", "@R/runs/../runs/x"):
        text = f'pipeline_config = "@R/models/effdet/pipeline.config"\nmodel_dir = "{model_dir}"\n'
        assert isinstance(parse(text, tree, ctx), JobSpec), model_dir


def test_model_dir_is_resolved_so_one_directory_has_one_spelling(tree, ctx):
    root = tree[0]
    (root / "runs" / "m1").mkdir()
    (root / "alias").symlink_to(root / "runs")
    for spelling in ("@R/runs/m1", "@R/runs/m1/", "@R/runs/./m1", "@R/runs/x/../m1", "@R//runs/m1", "@R/alias/m1"):
        text = f'pipeline_config = "@R/models/effdet/pipeline.config"\nmodel_dir = "{spelling}"\n'
        assert parse(text, tree, ctx).model_dir == f"{root}/runs/m1", spelling


def test_gpus_forms_and_gpu_count(tree, ctx):
    def spec(gpus: str) -> JobSpec:
        return parse(BASE + f"[train]\ngpus = {gpus}\n", tree, ctx)
    assert spec('"auto"').train.gpus is None
    assert spec("0").train.gpus == 0 and spec("[2, 0]").train.gpus == (2, 0)
    assert gpu_count(parse(BASE, tree, ctx).train.gpus, available=4) == 1
    assert gpu_count(parse(BASE, tree, ctx).train.gpus, available=0) == 0
    assert gpu_count(parse(BASE, tree, ctx).train.gpus) is None  # auto, before the daemon allocates
    assert gpu_count(spec("3").train.gpus, available=8) == 3
    assert gpu_count(spec("0").train.gpus, available=8) == 0
    assert gpu_count(spec("[5, 7]").train.gpus, available=8) == 2
    assert gpu_count([5, 7]) == 2  # a job.json's list (JobSpec.to_dict)


def test_shipped_example_parses(tree):
    root = tree[0]
    text = (REPO / "etc/jobs/example.toml").read_text().replace("/srv/oddaemon", str(root))
    for rel in ("models/efficientdet_d0_coco17_tpu-32/pipeline.config",
                "models/efficientdet_d0_coco17_tpu-32/checkpoint/ckpt-0.index",
                "data/widgets/label_map.pbtxt", "data/widgets/train-00.tfrecord", "data/widgets/eval.tfrecord"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    spec = parse_job(text.encode(), "example.toml", ValidationContext(allowed_roots=(str(root),)))
    assert isinstance(spec, JobSpec), rendered(spec)
    assert spec.name == "widgets-effdet-d0"
    assert spec.pipeline == PipelineEdits(
        num_classes=3, batch_size=8, num_steps=25000, learning_rate_base=0.01, warmup_learning_rate=0.001,
        warmup_steps=1000, total_steps=25000,
        fine_tune_checkpoint=f"{root}/models/efficientdet_d0_coco17_tpu-32/checkpoint/ckpt-0",
        fine_tune_checkpoint_type="detection", label_map_path=f"{root}/data/widgets/label_map.pbtxt",
        train_input_path=(f"{root}/data/widgets/train-*.tfrecord",),
        eval_input_path=(f"{root}/data/widgets/eval.tfrecord",))
    assert spec.train == TrainOptions(gpus=1, checkpoint_every_n=1000, checkpoint_max_to_keep=7)
    assert spec.eval == EvalOptions(enabled=True, device="cpu", sample_1_of_n_eval_examples=1, export_best=True,
                                    export_when="end")


def test_to_dict_is_json_safe_and_round_trips():
    spec = JobSpec(name="j", pipeline_config="/r/p.config", model_dir="/r/m", priority=-5,
                   pipeline=PipelineEdits(num_classes=2, learning_rate_base=0.5, train_input_path=("/r/a", "/r/b*"),
                                          fine_tune_checkpoint="/r/ckpt-0"),
                   train=TrainOptions(gpus=(0, 3), max_restarts=0), eval=EvalOptions(enabled=False, device="auto"))
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["pipeline"]["train_input_path"] == ["/r/a", "/r/b*"] and data["train"]["gpus"] == [0, 3]
    assert JobSpec.from_dict(data) == spec
    for simple in (JobSpec("a", "/p", "/m"), JobSpec("a", "/p", "/m", train=TrainOptions(gpus=2))):
        assert JobSpec.from_dict(json.loads(json.dumps(simple.to_dict()))) == simple


def test_allowed_keys_match_the_dataclasses():
    assert ALLOWED_KEYS[""] == ("name", "pipeline_config", "model_dir", "priority", "after", "pipeline", "train",
                                "eval", "slurm", "notify", "sweep")
    assert ALLOWED_KEYS["slurm"] == ("time_limit", "partition", "nodes")
    assert ALLOWED_KEYS["sweep"] == ("method", "values", "samples", "seed", "halving_steps", "keep_fraction")
    assert ALLOWED_KEYS["notify"] == ("events", "targets", "stalled_after_seconds")
    assert "num_classes" in ALLOWED_KEYS["pipeline"] and len(ALLOWED_KEYS["pipeline"]) == 12
    assert ALLOWED_KEYS["train"] == ("gpus", "checkpoint_every_n", "checkpoint_max_to_keep", "max_restarts",
                                     "hang_timeout_seconds", "oom_retry_halve_batch", "min_batch_size", "memory_max",
                                     "cpu_weight")
    assert ALLOWED_KEYS["eval"] == ("enabled", "device", "sample_1_of_n_eval_examples", "metric", "higher_is_better",
                                    "export_best", "export_when", "patience", "min_delta", "when_behind", "max_behind",
                                    "max_pinned_bytes", "memory_max", "cpu_weight")


def test_render_error_file(tree, ctx):
    problems = parse('a = 1\nb = 2 3\n', tree, ctx) + [Problem("[train] gpus: GPU id 3 is listed twice", "train.gpus")]
    text = render_error_file("job.toml", problems)
    lines = text.splitlines()
    assert lines[0].startswith("Job file 'job.toml' was rejected because")
    assert lines[1] == "2 problems:"
    assert lines[2] == "  - line 2, column 7: TOML syntax error: expected newline or end of document after a statement"
    assert lines[3] == "  - [train] gpus: GPU id 3 is listed twice"
    assert "etc/jobs/example.toml" in lines[4] and '"Job spec"' in lines[4]
    assert render_error_file("x.toml", problems[:1]).splitlines()[1] == "1 problem:"


# --- property tests: no input makes parse_job raise ---------------------------------------------------

def toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                 else repr(value))
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


PATH_SAMPLES = ["@R/models/effdet/pipeline.config", "@R/runs/m1", "@R/afile", "@R/data/*.tfrecord", "@R/link/x",
                "@R/../outside/secret.config", "@R/models/effdet/checkpoint/ckpt-0", "rel/x", "/", ""]
text_strategy = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
scalars = (st.integers(-2**70, 2**70) | st.floats() | st.booleans() | text_strategy
           | st.sampled_from(PATH_SAMPLES + ["auto", "cpu", "gpu", "detection"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(text_strategy, inner, max_size=3), max_leaves=10)
any_key = st.sampled_from(sorted({k for keys in ALLOWED_KEYS.values() for k in keys})) | text_strategy
tables = st.dictionaries(any_key, values, max_size=5)
small_values = st.integers(-3, 70) | st.floats(-1, 2) | st.sampled_from(PATH_SAMPLES + ["cpu", "detection", True])
sections = {section: st.fixed_dictionaries({}, optional={k: small_values | st.lists(small_values, max_size=3)
                                                         for k in ALLOWED_KEYS[section]})
            for section in ("pipeline", "train", "eval")}
# Mostly-known keys with plausible values, so that validation (not just the key check) is exercised too.
plausible = st.fixed_dictionaries(
    {"pipeline_config": st.just("@R/models/effdet/pipeline.config"), "model_dir": st.sampled_from(PATH_SAMPLES)},
    optional={"priority": small_values, "name": text_strategy, **sections})
documents = st.dictionaries(any_key, values | tables, max_size=8) | plausible


def check_result(result) -> None:
    assert isinstance(result, JobSpec) or (isinstance(result, list) and result
                                           and all(isinstance(p, Problem) and p.message for p in result))
    if isinstance(result, list):
        render_error_file("job.toml", result)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(data, ctx):
    check_result(parse_job(data, "fuzz.toml", ctx))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents, filename=st.sampled_from(["fuzz.toml", "bad name.toml", ".toml", "x" * 80]))
def test_arbitrary_toml_documents_never_raise(doc, filename, tree, ctx):
    text = "\n".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items())
    data = expand(text, tree)
    check_result(parse_job(data, filename, ctx))


def test_property_generator_emits_valid_toml():
    doc = {"name": "a\x7f\n", "pipeline": {"gpus": [1, 2.5, -1e300, True], "x": {"y": math.inf}}}
    text = "\n".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items())
    assert tomllib.loads(text) == doc


def test_workers_count_gpus_by_the_same_rule():
    from oddaemon.workers import gpu_count_for  # noqa: PLC0415  (the workers' package, only here)

    def job(wanted, allocated=None):
        return {"spec": {"train": {"gpus": wanted}}, **({"gpus": allocated} if allocated is not None else {})}
    assert gpu_count_for(job(None, allocated=[3])) == 1  # the daemon's allocation wins
    assert gpu_count_for(job([1, 2, 3])) == 3 and gpu_count_for(job(2)) == 2 and gpu_count_for(job(0)) == 0
    assert gpu_count_for(job(None)) is None and gpu_count_for(job(True)) is None  # not known before allocation


def test_slurm_table_is_validated_like_the_others(tree, ctx):
    """[slurm] in a job: a time limit in Slurm's format, a partition from the daemon's allowed set
    ([slurm] partitions), nodes up to its [slurm] max_nodes (default 1); each problem names its key."""
    from dataclasses import replace  # noqa: PLC0415 - only this test varies the context

    good = parse(BASE + '[slurm]\ntime_limit = "12:00:00"\npartition = "a100"\n', tree,
                 replace(ctx, slurm_partitions=("a100", "v100")))
    assert (good.slurm.time_limit, good.slurm.partition, good.slurm.nodes) == ("12:00:00", "a100", 1)
    bad = parse(BASE + '[slurm]\ntime_limit = "tomorrow"\npartition = "a100"\nnodes = 4\nqos = "high"\n', tree, ctx)
    texts = [p.render() for p in bad]
    assert any("[slurm] time_limit: must be a Slurm time limit" in t for t in texts)
    assert any("[slurm] partition: must be one of the partitions this daemon lets jobs choose ([slurm] "
               "partitions: none), got 'a100'" in t for t in texts)
    assert any("[slurm] nodes: must be a whole number of Slurm nodes from 1 to 1 (this daemon's [slurm] "
               "max_nodes)" in t for t in texts)
    assert any("unknown key 'qos' in [slurm]" in t for t in texts)


def test_a_checkpoint_a_job_in_after_is_to_write_is_accepted_and_recorded(tree, ctx):
    """A fine-tune from another job's export: with after, a fine_tune_checkpoint that does not exist
    yet is accepted, its real path recorded (the scheduler checks it lies in a dependency's
    model_dir); one that exists is not recorded; confinement still holds."""
    root, _ = tree
    text = ('after = ["pretrain"]\n' + BASE + '[pipeline]\nfine_tune_checkpoint = "@R/runs/pre/exported/checkpoint/ckpt-0"\n'
            'fine_tune_checkpoint_type = "detection"\n')
    spec = parse(text, tree, ctx)
    assert isinstance(spec, JobSpec), rendered(spec)
    assert spec.awaits_checkpoint == str(root / "runs/pre/exported/checkpoint/ckpt-0")
    assert spec.pipeline.fine_tune_checkpoint == str(root / "runs/pre/exported/checkpoint/ckpt-0")
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    existing = parse('after = ["pretrain"]\n' + BASE + '[pipeline]\nfine_tune_checkpoint = "@R/models/effdet/checkpoint/ckpt-0"\n',
                     tree, ctx)
    assert isinstance(existing, JobSpec) and existing.awaits_checkpoint == ""
    outside = parse('after = ["pretrain"]\n' + BASE + '[pipeline]\nfine_tune_checkpoint = "@R/link/ckpt-0"\n', tree, ctx)
    assert "is outside the allowed roots" in rendered(outside)
    assert "awaits_checkpoint" not in ALLOWED_KEYS[""]  # (not a key a job file may set)
    forged = parse(BASE + 'awaits_checkpoint = "@R/x"\n', tree, ctx)
    assert "unknown key 'awaits_checkpoint'" in rendered(forged)
