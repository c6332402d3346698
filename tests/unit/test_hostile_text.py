"""The pure defences against hostile job files: the pre-scan before tomllib, escaping of what came
from outside, short unique .error names, the paths that only pipeline.config names, and messages
that say what a thing is."""

from __future__ import annotations

import os
import time

from oddaemon.adapters.spool import NAME_MAX, short_stem
from oddaemon.core.checks import render_error_file
from oddaemon.core.job_validation import ValidationContext, parse_job
from oddaemon.core.jobspec import JobSpec, PipelineEdits
from oddaemon.core.prescan import MAX_KEY_PARTS, prescan
from oddaemon.core.printable import printable
from oddaemon.formats.pipeline_paths import effective_paths, scan


def test_the_prescan_refuses_long_dotted_keys_and_headers_at_once_with_the_line():
    for text in ("x = 1\n" + ".".join(["b"] * 100_000) + " = 1\n", "x = 1\n[" + ".".join(["a"] * 100_000) + "]\n",
                 'y = 2\nz = { ' + ".".join(['"q"'] * 40) + " = 1 }\n"):
        started = time.process_time()
        problem = prescan(text)
        assert time.process_time() - started < 1.0  # linear: 100,000 parts in milliseconds (a generous bound)
        assert problem is not None and problem.line == 2 and f"(more than {MAX_KEY_PARTS})" in problem.message
    assert prescan('name = "a.b"\n[pipeline]\nnum_classes = 3\npipeline.batch_size = 4\nlr = 1.5e-3\n') is None
    assert prescan("a.b.c.d.e.f.g.h = 1\n") is None  # a few parts are fine (and then unknown keys)


def test_a_bom_is_accepted_and_the_problem_count_is_the_real_one(tmp_path):
    ctx = ValidationContext(allowed_roots=(str(tmp_path),))
    problems = parse_job(b"\xef\xbb\xbfname = 5\n", "bom.toml", ctx)
    assert "line 1, column 1" not in problems[0].render() and "name: must be a string" in problems[0].render()
    many = parse_job("".join(f"k{i} = 1\n" for i in range(60_000)).encode(), "many.toml", ctx)
    text = render_error_file("many.toml", many)
    assert "\n60002 problems:\n" in text  # 60,000 unknown keys + the two missing required keys


def test_printable_escapes_controls_and_invisible_format_characters():
    forged = "t08c\n2026-12-02 03:20:00,000 INFO accepted job FORGED\x1b[31mRED\u202e.toml"
    shown = printable(forged)
    assert "\n" not in shown and "\x1b" not in shown and "\u202e" not in shown
    assert shown == "t08c\\n2026-12-02 03:20:00,000 INFO accepted job FORGED\\x1b[31mRED\\u202e.toml"
    assert printable("plain é 日本") == "plain é 日本"
    first = render_error_file(forged, []).splitlines()[0]
    assert first.startswith("Job file 't08c\\n2026") and "\x1b" not in first


def test_a_name_too_long_for_its_error_sibling_is_shortened_uniquely(tmp_path):
    long_a, long_b = "a" * 250, "a" * 249 + "b"
    for stem in (long_a, long_b, "é" * 126):
        short = short_stem(stem)
        assert len(os.fsencode(short + ".99999.toml.error")) <= NAME_MAX
        (tmp_path / f"{short}.toml.error").write_text("ok")  # the file system takes it
    assert short_stem(long_a) != short_stem(long_b) and short_stem("job") == "job"


CONFIG = '''
model { ssd { num_classes: 3 } }
train_config {
  batch_size: 4
  fine_tune_checkpoint: "/zoo/ckpt-0"  # a comment with "quotes" and { braces
}
train_input_reader {
  label_map_path: "/etc/shadow"
  tf_record_input_reader { input_path: ["/data/a-*.tfrecord", '/data/b.tfrecord'] }
}
eval_input_reader: {
  label_map_path: "/data/\\154abel.pbtxt"
  tf_record_input_reader { input_path: "/data/eval.tfrecord" }
}
'''


def test_the_paths_pipeline_config_names_are_read_from_its_text_format():
    found = [(blocks[0], field, value, line) for blocks, field, value, line in scan(CONFIG)]
    assert found == [("train_config", "fine_tune_checkpoint", "/zoo/ckpt-0", 5),
                     ("train_input_reader", "label_map_path", "/etc/shadow", 8),
                     ("train_input_reader", "input_path", "/data/a-*.tfrecord", 9),
                     ("train_input_reader", "input_path", "/data/b.tfrecord", 9),
                     ("eval_input_reader", "label_map_path", "/data/label.pbtxt", 12),
                     ("eval_input_reader", "input_path", "/data/eval.tfrecord", 13)]


def test_a_job_edit_replaces_what_pipeline_config_says():
    edits = PipelineEdits(label_map_path="/srv/l.pbtxt", train_input_path=("/srv/t.tfrecord",))
    paths = [(p.path, p.kind) for p in effective_paths("/x/p.config", CONFIG, edits)]
    assert paths == [("/zoo/ckpt-0", "checkpoint"), ("/data/eval.tfrecord", "glob")]
    label = effective_paths("/x/p.config", CONFIG, PipelineEdits())[1].label
    assert label == "pipeline_config /x/p.config line 8: train_input_reader.label_map_path"


def test_paths_inside_pipeline_config_are_confined_at_submission(tmp_path):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "t.tfrecord").write_bytes(b"")
    config = root / "p.config"
    config.write_text('model { ssd { num_classes: 3 } }\ntrain_input_reader {\n  label_map_path: "/etc/shadow"\n'
                      f'  tf_record_input_reader {{ input_path: "{tmp_path}/outside/*.tfrecord" }}\n}}\n')
    job = f'pipeline_config = "{config}"\nmodel_dir = "{root}/m"\n'.encode()
    problems = [p.render() for p in parse_job(job, "j.toml", ValidationContext(allowed_roots=(str(root),)))]
    assert problems == [
        f"pipeline_config {config} line 3: train_input_reader.label_map_path: /etc/shadow is outside the allowed "
        f"roots {root}; set the [pipeline] key that replaces it, or fix the pipeline.config",
        f"pipeline_config {config} line 4: train_input_reader input_path: {tmp_path}/outside/*.tfrecord is outside "
        f"the allowed roots {root}; set the [pipeline] key that replaces it, or fix the pipeline.config"]
    fixed = job + f'[pipeline]\nlabel_map_path = "{config}"\ntrain_input_path = "{root}/data/t.tfrecord"\n'.encode()
    assert isinstance(parse_job(fixed, "j.toml", ValidationContext(allowed_roots=(str(root),))), JobSpec)


def test_fifos_model_dirs_under_files_and_long_components_are_named(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "labels.pbtxt")
    (root / "afile").write_text("x")
    (root / "p.config").write_text("model { ssd { num_classes: 3 } }\n")
    ctx = ValidationContext(allowed_roots=(str(root),))

    def problems(extra: str, model_dir: str = f"{root}/m") -> list[str]:
        text = f'pipeline_config = "{root}/p.config"\nmodel_dir = "{model_dir}"\n{extra}'
        result = parse_job(text.encode(), "j.toml", ctx)
        return [p.render() for p in result] if isinstance(result, list) else []

    assert problems(f'[pipeline]\nlabel_map_path = "{root}/labels.pbtxt"\n') == [
        f"[pipeline] label_map_path: {root}/labels.pbtxt is a FIFO (named pipe), not a regular file"]
    assert problems(f'[pipeline]\ntrain_input_path = "{root}/label*"\n') == [
        f"[pipeline] train_input_path: {root}/label* matches no regular file: {root}/labels.pbtxt is a FIFO "
        "(named pipe)"]
    assert problems("", f"{root}/afile/m") == [
        f"model_dir: {root}/afile/m cannot be created: {root}/afile is a regular file, not a directory"]
    assert "longer than 255 bytes" in problems("", f"{root}/{'x' * 256}")[0]
    assert problems("", str(root)) == [
        f"model_dir: {root} is an allowed root itself; give the job a directory of its own below it (e.g. {root}/<name>)"]
