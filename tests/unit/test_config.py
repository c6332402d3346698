"""Daemon configuration: defaults, the shipped file, relative paths, and every kind of error."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import pytest

from oddaemon.core.config import DEFAULT_PORT, SCHEMA, Config, load_config, parse_config, split_listen_address
from oddaemon.core.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
PATH = "/etc/oddaemon/oddaemon.toml"


def problems_of(text: str, path: str = PATH) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path)
    assert info.value.path == path and info.value.problems
    return info.value.problems


def test_defaults():
    config = load_config(None)
    assert config == Config(path=None)
    assert (config.spool_dir, config.state_dir, config.log_dir) == (
        "/var/spool/oddaemon", "/var/lib/oddaemon", "/var/log/oddaemon")
    assert config.metrics_listen == f"127.0.0.1:{DEFAULT_PORT}" and config.metrics_address() == ("127.0.0.1", 9781)
    assert config.gpus == "auto" and config.allowed_roots == ("/srv/oddaemon", "/var/lib/oddaemon/models")
    assert (config.max_restarts, config.backoff_base_seconds, config.backoff_cap_seconds) == (3, 10.0, 600.0)
    assert config.resolved_worker_python() == sys.executable
    ctx = config.validation_context()
    assert ctx.allowed_roots == config.allowed_roots and ctx.max_file_bytes == 1_048_576


def test_empty_file_gives_the_defaults():
    assert parse_config("", PATH) == Config(path=PATH)


def test_shipped_config_equals_the_defaults():
    path = REPO / "etc/oddaemon.toml"
    config = load_config(str(path))
    assert config.path == str(path)
    assert dataclasses.replace(config, path=None) == Config(path=None)


def test_shipped_config_lists_every_key():
    text = (REPO / "etc/oddaemon.toml").read_text()
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:  # (a table of tables, [notify.targets.NAME], is shown as a commented example)
            assert f"\n{key} = " in text or f"\n#   [{section}.{key}." in text, key


def test_schema_covers_every_config_field():
    mapped = [field for keys in SCHEMA.values() for field, _ in keys.values()]
    assert sorted(mapped) == sorted(f.name for f in dataclasses.fields(Config) if f.name != "path")


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "oddaemon.toml").write_text(
        '[paths]\nspool_dir = "run/spool"\nstate_dir = "../state"\nlog_dir = "/abs/logs"\n'
        '[jobs]\nallowed_roots = ["data", "/srv/x"]\n[worker]\npython = ".venv/bin/python"\n')
    config = load_config(str(project / "oddaemon.toml"))
    assert config.spool_dir == str(project / "run/spool")
    assert config.state_dir == str(tmp_path / "state")
    assert config.log_dir == "/abs/logs"
    assert config.allowed_roots == (str(project / "data"), "/srv/x")
    assert config.worker_python == str(project / ".venv/bin/python")
    assert config.resolved_worker_python() == str(project / ".venv/bin/python")


def test_bare_worker_python_is_looked_up_on_path():
    config = parse_config('[worker]\npython = "sh"\n', PATH)
    assert config.worker_python == "sh"
    assert config.resolved_worker_python().endswith("/sh")
    assert parse_config('[worker]\npython = "no-such-python-xyz"\n', PATH).resolved_worker_python() == "no-such-python-xyz"


@pytest.mark.parametrize("devices, expected", [('"auto"', "auto"), ('"none"', ()), ("[]", ()), ("[1, 0]", (1, 0))])
def test_gpu_devices(devices, expected):
    assert parse_config(f"[gpus]\ndevices = {devices}\n", PATH).gpus == expected


@pytest.mark.parametrize("listen, expected", [
    ("0.0.0.0:9100", ("0.0.0.0", 9100)), ("[::1]:9781", ("::1", 9781)), ("localhost:1", ("localhost", 1)),
    ("metrics.example.org:65535", ("metrics.example.org", 65535)),
])
def test_listen_addresses(listen, expected):
    config = parse_config(f'[metrics]\nlisten = "{listen}"\n', PATH)
    assert config.metrics_address() == expected == split_listen_address(listen)


def test_metrics_disabled():
    assert parse_config('[metrics]\nlisten = ""\n', PATH).metrics_address() is None


BAD = [
    ("unknown-key", '[paths]\nspool = "/x"\n',
     f"unknown key 'spool' in [paths] of {PATH}; did you mean 'spool_dir'? Allowed keys: spool_dir, state_dir, log_dir"),
    ("unknown-key-no-match", "[logs]\nzzz = 1\n", f"unknown key 'zzz' in [logs] of {PATH}. Allowed keys: max_bytes"),
    ("unknown-section", "[restarts]\nmax_restarts = 1\n", f"unknown section [restarts] in {PATH}; did you mean [restart]?"),
    ("key-outside-section", 'spool_dir = "/x"\n', f"key 'spool_dir' at the top level of {PATH} belongs in the [paths] section"),
    ("section-not-table", "paths = 3\n", f"[paths] in {PATH} must be a table (a [paths] section), got 3"),
    ("string-for-int", '[logs]\nbackups = "five"\n',
     f"[logs] backups in {PATH}: must be a whole number from 0 to 1000, got 'five'"),
    ("bool-for-int", "[restart]\nmax_restarts = true\n",
     f"[restart] max_restarts in {PATH}: must be a whole number from 0 to 1000, got true"),
    ("float-for-int", "[jobs]\nmax_cpu_jobs = 1.5\n", f"[jobs] max_cpu_jobs in {PATH}: must be a whole number from 1 to 1024"),
    ("int-for-path", "[paths]\nspool_dir = 5\n", f"[paths] spool_dir in {PATH}: must be a non-empty path string, got 5"),
    ("empty-path", '[paths]\nlog_dir = ""\n', "[paths] log_dir in /etc/oddaemon/oddaemon.toml: must be a non-empty path"),
    ("backups-too-many", "[logs]\nbackups = 1001\n", "got 1001"),
    ("max-bytes-small", "[logs]\nmax_bytes = 100\n", f"[logs] max_bytes in {PATH}: must be a whole number >= 4096, got 100"),
    ("listen-no-port", '[metrics]\nlisten = "localhost"\n',
     f"[metrics] listen in {PATH}: must be host:port or [ipv6-address]:port (e.g. 127.0.0.1:9781)"),
    ("listen-port-zero", '[metrics]\nlisten = "127.0.0.1:0"\n', "port 0 is out of range; it must be from 1 to 65535"),
    ("listen-port-big", '[metrics]\nlisten = "[::1]:65536"\n', "port 65536 is out of range"),
    ("listen-bad-v6", '[metrics]\nlisten = "[nothost]:80"\n', "'nothost' in brackets is not an IPv6 address"),
    ("listen-bare-v6", '[metrics]\nlisten = "::1:80"\n', "must be host:port or [ipv6-address]:port"),
    ("listen-not-string", "[metrics]\nlisten = 9781\n", f"[metrics] listen in {PATH}: must be a string"),
    ("cap-below-base", "[restart]\nbackoff_base_seconds = 60\nbackoff_cap_seconds = 30\n",
     f"[restart] backoff_cap_seconds in {PATH}: 30 is smaller than backoff_base_seconds 60"),
    ("cap-below-default-base", "[restart]\nbackoff_cap_seconds = 5\n", "5 is smaller than backoff_base_seconds 10"),
    ("base-zero", "[restart]\nbackoff_base_seconds = 0\n", "backoff_base_seconds in /etc/oddaemon/oddaemon.toml: must be a "
     "finite number > 0, got 0"),
    ("reset-nan", "[restart]\nreset_after_seconds = nan\n", "must be a finite number > 0, got nan"),
    ("grace-negative", "[jobs]\nstop_grace_seconds = -1\n", "stop_grace_seconds in /etc/oddaemon/oddaemon.toml: must be a "
     "finite number >= 0"),
    ("devices-word", '[gpus]\ndevices = "all"\n', "must be \"auto\", \"none\" or a list of GPU ids such as [0, 1], got 'all'"),
    ("devices-twice", "[gpus]\ndevices = [0, 2, 2]\n", f"[gpus] devices in {PATH}: GPU id 2 is listed twice"),
    ("devices-bool", "[gpus]\ndevices = [true]\n", "GPU ids must be whole numbers from 0 to 63, got true"),
    ("roots-empty", "[jobs]\nallowed_roots = []\n", "[jobs] allowed_roots in /etc/oddaemon/oddaemon.toml: must be a non-empty "
     "list of directories, got []"),
    ("roots-string", '[jobs]\nallowed_roots = "/srv"\n', "must be a non-empty list of directories, got '/srv'"),
    ("max-file-bytes", "[jobs]\nmax_file_bytes = 10\n", "[jobs] max_file_bytes in /etc/oddaemon/oddaemon.toml: must be a whole "
     "number from 1024 to 67108864"),
    ("submit-group-spaces", '[jobs]\nsubmit_group = " staff"\n', "must be a group name, or \"\" to let anyone"),
    ("worker-user-int", "[worker]\nuser = 1000\n", "[worker] user in /etc/oddaemon/oddaemon.toml: must be a user name"),
    ("allow-root-string", '[worker]\nallow_root = "yes"\n', "[worker] allow_root in /etc/oddaemon/oddaemon.toml: must be "
     "true or false"),
    ("module-bad", '[worker]\nmodule = "my-workers"\n', "[worker] module in /etc/oddaemon/oddaemon.toml: must be a dotted"),
    ("python-not-string", "[worker]\npython = false\n", "[worker] python in /etc/oddaemon/oddaemon.toml: must be a string"),
    ("event-loop", '[daemon]\nevent_loop = "uvloop"\n', "must be one of 'auto', 'glib', 'select', got 'uvloop'"),
    ("syntax-error", "[paths\n", f"{PATH} is not valid TOML: Expected ']' at the end of a table declaration (at line 1"),
]


@pytest.mark.parametrize("text, fragment", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_names_key_and_file(text, fragment):
    assert any(fragment in p for p in problems_of(text)), problems_of(text)


def test_all_problems_are_reported_together():
    problems = problems_of('[paths]\nspool = "/x"\n[logs]\nbackups = "five"\nmax_bytes = 1\n[metrics]\nlisten = "x"\n'
                           "[restart]\nbackoff_cap_seconds = 1\n[nope]\n")
    assert len(problems) == 6
    assert all(PATH in p for p in problems)
    text = str(ConfigError(PATH, problems))
    assert text.startswith(f"invalid configuration in {PATH}:") and "did you mean 'spool_dir'" in text


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.path == missing
    assert info.value.problems == [f"cannot read the configuration file {missing}: No such file or directory"]


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(str(tmp_path))  # a directory
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[paths]\nspool_dir = '\xff'\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(str(bad))
