"""The parser child validates with the daemon's whole context: every data field of
``ValidationContext`` crosses the pipe (a job's ``[slurm] partition`` was refused in the child because
the daemon's allowed partitions did not)."""

from __future__ import annotations

import base64
import json
from dataclasses import fields

from oddaemon.adapters.parser_child import decide
from oddaemon.adapters.parsers import context_fields
from oddaemon.core.job_validation import ValidationContext


def test_every_data_field_of_the_context_reaches_the_child():
    ctx = ValidationContext(allowed_roots=("/data",), max_file_bytes=1234, slurm_partitions=("a100",),
                            notify_targets=("team",))
    sent = json.loads(json.dumps(context_fields(ctx)))
    data_fields = {f.name for f in fields(ctx) if not callable(getattr(ctx, f.name))}
    assert set(sent) == data_fields
    assert sent["slurm_partitions"] == ["a100"] and sent["notify_targets"] == ["team"]


def test_a_job_choosing_an_allowed_partition_is_accepted_by_the_child(tmp_path):
    pipeline = tmp_path / "pipeline.config"
    pipeline.write_text("model { ssd { num_classes: 2 } }\ntrain_config { batch_size: 4 num_steps: 10 }\n")
    job = (f'name = "p"\npipeline_config = "{pipeline}"\nmodel_dir = "{tmp_path}/model"\n'
           '[slurm]\npartition = "a100"\n')
    ctx = ValidationContext(allowed_roots=(str(tmp_path),), slurm_partitions=("a100", "v100"))
    request = {"id": 1, "filename": "p.toml", "data": base64.b64encode(job.encode()).decode(),
               "context": json.loads(json.dumps(context_fields(ctx)))}
    reply = decide(request)
    assert "spec" in reply, reply
    assert reply["spec"]["slurm"]["partition"] == "a100"
    refused = decide({**request, "context": {**request["context"], "slurm_partitions": ["v100"]}})
    assert "partition" in json.dumps(refused["problems"])
