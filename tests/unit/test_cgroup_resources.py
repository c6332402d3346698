"""Per-job limits, pure (core/resources.py, core/cgroup_text.py): sizes, defaults and ceilings, the
host-oom sentence, the job spec and daemon configuration keys, and the cgroup files' text."""

from __future__ import annotations

import pytest

from oddaemon.core import cgroup_text as text
from oddaemon.core.checks import Invalid
from oddaemon.core.config import parse_config
from oddaemon.core.errors import ConfigError
from oddaemon.core.failures import FATAL_KINDS, KINDS
from oddaemon.core.job_validation import ValidationContext, parse_job
from oddaemon.core.jobspec import JobSpec
from oddaemon.core.resources import (
    Defaults,
    Limits,
    cgroup_name,
    format_bytes,
    host_oom_failure,
    limits_for,
    parse_size,
    usage_line,
)

G = 1024**3


@pytest.mark.parametrize("value, expected", [
    (8589934592, 8 * G), ("8G", 8 * G), ("8g", 8 * G), ("8GiB", 8 * G), ("8GB", 8 * G), ("512M", 512 * 1024**2),
    ("1.5G", int(1.5 * G)), ("100", 100), ("64K", 65536), ("2T", 2 * 1024**4), (" 3G ", 3 * G),
])
def test_sizes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "G", "8X", "-1G", "8 G B", 0, -5, 1.5, True, [8], "0.1"])
def test_bad_sizes(value):
    with pytest.raises(Invalid, match="memory size|at least 1 byte"):
        parse_size(value)


def test_bytes_in_words():
    assert format_bytes(8 * G) == "8 GiB" and format_bytes(int(7.9 * G)) == "7.9 GiB"
    assert format_bytes(512 * 1024**2) == "512 MiB" and format_bytes(100) == "100 B" and format_bytes(None) == "-"


def spec(train: str = "", evaluation: str = "") -> JobSpec:
    d = {"name": "effdet", "pipeline_config": "/p", "model_dir": "/m", "train": {}, "eval": {}}
    for table, body in (("train", train), ("eval", evaluation)):
        for line in filter(None, body.split(";")):
            key, value = line.split("=")
            d[table][key] = int(value)
    return JobSpec.from_dict(d)


def test_limits_come_from_the_job_else_the_daemon_and_a_cpu_evaluator_weighs_less():
    defaults = Defaults(train_memory_max=8 * G, eval_memory_max=2 * G)
    assert limits_for("train", spec(), defaults, on_cpu=True) == Limits(8 * G, 100)
    assert limits_for("eval", spec(), defaults, on_cpu=True) == Limits(2 * G, 20)  # beside the trainer
    assert limits_for("eval", spec(), defaults, on_cpu=False) == Limits(2 * G, 100)  # on its own GPU
    assert limits_for("export", spec(), defaults, on_cpu=True) == Limits(2 * G, 100)
    mine = spec(train=f"memory_max={4 * G};cpu_weight=500", evaluation="memory_max=1000000000;cpu_weight=50")
    assert limits_for("train", mine, defaults, on_cpu=True) == Limits(4 * G, 500)
    assert limits_for("eval", mine, defaults, on_cpu=True) == Limits(1_000_000_000, 50)
    assert limits_for("train", spec(), Defaults(), on_cpu=True) == Limits(None, 100)  # no memory limit by default


def test_host_oom_sentence_names_the_job_its_use_and_its_limit():
    failure = host_oom_failure("effdet", "train", int(7.9 * G), 8 * G)
    assert failure.kind == "host-oom" and "host-oom" in KINDS and "host-oom" not in FATAL_KINDS
    assert failure.retry  # the same restart rules as any retryable failure
    assert failure.message.startswith("job effdet used 7.9 GiB of its 8 GiB memory_max: the kernel's OOM killer "
                                      "ended its training worker (train); raise [train] memory_max")
    ev = host_oom_failure("effdet", "export", 3 * G, 3 * G).message
    assert "export worker (export)" in ev and "raise [eval] memory_max" in ev
    assert "used 5 GiB of host memory" in host_oom_failure("x", "eval", 5 * G, None).message
    assert cgroup_name("effdet", "eval") == "job-effdet-eval"


def test_usage_line():
    line = usage_line("train", {"cpu_seconds": 12.34, "memory_bytes": G, "memory_peak_bytes": 2 * G,
                                "memory_max_bytes": 8 * G, "io_read_bytes": 0, "io_write_bytes": 1024,
                                "cpu_weight": 100})
    assert line == ("train: cpu 12.3 s, memory 1 GiB (peak 2 GiB) of 8 GiB, io read 0 B written 1 KiB, "
                    "cpu weight 100")
    assert usage_line("eval", {}) == "eval: no numbers yet"


# ---- the job spec keys and the daemon's ceilings

def job(tmp_path, body: str, ceilings=(None, 10_000)):
    (tmp_path / "p.config").write_text("model {}\n")
    text_ = f'pipeline_config = "{tmp_path}/p.config"\nmodel_dir = "{tmp_path}/m"\n{body}'
    return parse_job(text_.encode(), "effdet.toml", ValidationContext((str(tmp_path),), resource_ceilings=ceilings))


def messages(result) -> list[str]:
    assert isinstance(result, list), result
    return [p.message for p in result]


def test_job_keys_are_validated_with_the_key_named(tmp_path):
    ok = job(tmp_path, '[train]\nmemory_max = "8G"\ncpu_weight = 300\n[eval]\nmemory_max = 1073741824\n'
                       'cpu_weight = 10\n')
    assert (ok.train.memory_max, ok.train.cpu_weight, ok.eval.memory_max, ok.eval.cpu_weight) == (8 * G, 300, G, 10)
    assert JobSpec.from_dict(ok.to_dict()) == ok
    bad = messages(job(tmp_path, '[train]\nmemory_max = "lots"\ncpu_weight = 0\n[eval]\nmemory_max = "1M"\n'))
    assert any(m.startswith("[train] memory_max: must be a memory size") for m in bad), bad
    assert any(m.startswith("[train] cpu_weight: must be a whole number from 1 to 10000") for m in bad), bad
    assert any(m.startswith("[eval] memory_max: '1M' is less than 16 MiB") for m in bad), bad


def test_a_job_above_the_daemons_ceiling_is_rejected_naming_key_and_setting(tmp_path):
    bad = messages(job(tmp_path, '[train]\nmemory_max = "100G"\ncpu_weight = 2000\n', ceilings=(64 * G, 1000)))
    assert "[train] memory_max: '100G' is above this daemon's ceiling of 64 GiB ([cgroups] memory_max_ceiling " \
           "in oddaemon.toml)" in bad
    assert "[train] cpu_weight: 2000 is above this daemon's ceiling of 1000 ([cgroups] cpu_weight_ceiling in " \
           "oddaemon.toml)" in bad
    assert not isinstance(job(tmp_path, '[train]\nmemory_max = "64G"\n', ceilings=(64 * G, 1000)), list)


def test_daemon_settings_defaults_and_ceilings():
    config = parse_config('[cgroups]\nmode = "off"\ntrain_memory_max = "8G"\neval_memory_max = "max"\n'
                          'cpu_eval_cpu_weight = 5\nmemory_max_ceiling = "64G"\ncpu_weight_ceiling = 1000\n', "/x.toml")
    assert config.cgroups == Defaults(mode="off", train_memory_max=8 * G, eval_memory_max=None,
                                      cpu_eval_cpu_weight=5, memory_max_ceiling=64 * G, cpu_weight_ceiling=1000)
    assert config.validation_context().resource_ceilings == (64 * G, 1000)
    with pytest.raises(ConfigError) as info:
        parse_config('[cgroups]\nmode = "v3"\ntrain_memory_max = "80G"\nmemory_max_ceiling = "64G"\n'
                     "train_cpu_weight = 20000\n", "/x.toml")
    problems = "\n".join(info.value.problems)
    assert "[cgroups] mode in /x.toml: must be one of 'auto', 'off', 'v1', 'v2'" in problems
    assert "[cgroups] train_memory_max in /x.toml: 80 GiB is above memory_max_ceiling 64 GiB" in problems
    assert "[cgroups] train_cpu_weight in /x.toml: must be a whole number from 1 to 10000" in problems


# ---- the cgroup files' text

def test_proc_self_cgroup_v1_hybrid_and_v2():
    hybrid = "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/x\n0::/\n"
    assert text.proc_cgroups(hybrid) == {"name=systemd": "/", "memory": "/process_api/abc", "cpu": "/x",
                                         "cpuacct": "/x", "": "/"}
    assert text.proc_cgroups("0::/system.slice/oddaemon.service\n") == {"": "/system.slice/oddaemon.service"}
    assert text.proc_cgroups("garbage\n") == {}


def test_flat_keyed_files():
    events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n"
    assert text.flat_keyed(events)["oom_kill"] == 1
    assert text.flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")["oom_kill"] == 3  # v1 memory.oom_control
    stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\nnr_periods 0\nbroken line here\n"
    assert text.flat_keyed(stat) == {"usage_usec": 1234567, "user_usec": 1000000, "system_usec": 234567,
                                     "nr_periods": 0}


def test_single_values_and_limits():
    assert text.single_value("8589934592\n") == 8 * G and text.single_value("max\n") is None
    assert text.single_value("") is None
    assert text.v1_limit("9223372036854771712\n") is None and text.v1_limit("134217728\n") == 128 * 1024**2


def test_io_stat_and_pressure():
    io = "8:0 rbytes=1000 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n253:1 rbytes=5 wbytes=7 rios=1 wios=1\n"
    assert text.io_bytes(io) == (1005, 27) and text.io_bytes("") == (0, 0)
    psi = "some avg10=1.50 avg60=0.00 avg300=0.00 total=2500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=10\n"
    assert text.pressure(psi)["some"] == {"avg10": 1.5, "avg60": 0.0, "avg300": 0.0, "total": 2500000.0}
    assert text.pressure(psi)["full"]["total"] == 10.0


def test_controllers_and_procs():
    assert text.controllers("cpuset cpu io memory pids\n") == {"cpuset", "cpu", "io", "memory", "pids"}
    assert text.procs("12\n345\n") == [12, 345] and text.procs("") == []
