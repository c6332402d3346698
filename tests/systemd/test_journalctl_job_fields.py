"""Under the real journald of the booted container: the daemon's records carry ``ODDAEMON_JOB`` and
the other fields (adapters/journal.py), so ``journalctl -u oddaemon ODDAEMON_JOB=<name>`` is one
job's story."""

from __future__ import annotations

import json

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),  # alone, this test also boots the container (minutes)
]

NAME = "journal_story"


def test_journalctl_selects_one_job_s_records_by_its_field(installed):
    # The container is the session's (tests/systemd/conftest.py): the daemon is stopped again at the
    # end, as the next tests expect to start it themselves.
    try:
        _journal_story(installed)
    finally:
        installed.sh("systemctl stop oddaemon.service; systemctl reset-failed oddaemon.service", check=False,
                     timeout=180)


def _journal_story(installed):
    inst = installed
    inst.sh("systemctl reset-failed oddaemon.service; systemctl start oddaemon.service", timeout=180)
    inst.wait(lambda: inst.show("ActiveState")["ActiveState"] == "active", 60, "the daemon to run")
    pipeline = ("# standin: step_seconds = 0.01\nmodel {\n  ssd {\n    num_classes: 3\n  }\n}\n"
                "train_config {\n  batch_size: 4\n  num_steps: 10\n}\n")
    job = (f'name = "{NAME}"\npipeline_config = "/srv/oddaemon/{NAME}.config"\n'
           f'model_dir = "/srv/oddaemon/{NAME}_model"\n[pipeline]\nnum_steps = 10\n'
           "[train]\ncheckpoint_every_n = 5\n[eval]\nenabled = false\n")
    inst.c.run(["/bin/sh", "-c", f"cat > /srv/oddaemon/{NAME}.config"], user="alice", input=pipeline)
    inst.c.run(["/bin/sh", "-c", f"cat > /srv/oddaemon/{NAME}.toml"], user="alice", input=job)
    inst.c.run(["/opt/oddaemon/.venv/bin/oddaemon", "submit", "--wait", "0", f"/srv/oddaemon/{NAME}.toml"],
               user="alice")
    inst.wait(lambda: (inst.job(NAME) or {}).get("state") == "succeeded", 120, f"{NAME} to succeed")

    def entries():
        out = inst.sh(f"journalctl --no-pager -q -u oddaemon.service ODDAEMON_JOB={NAME} -o json", check=False).stdout
        found = [json.loads(line) for line in out.splitlines()]
        return found if any(e.get("ODDAEMON_STATE") == "succeeded" for e in found) else None

    story = inst.wait(entries, 60, f"journal entries with ODDAEMON_JOB={NAME}")
    messages = [e["MESSAGE"] for e in story]
    assert all(NAME in m for m in messages), messages
    assert [e["ODDAEMON_STATE"] for e in story if "ODDAEMON_STATE" in e][-1] == "succeeded", messages
    assert any(e.get("ODDAEMON_ROLE") == "train" and "worker started" in e["MESSAGE"] for e in story), messages
    assert all(e["SYSLOG_IDENTIFIER"] == "oddaemon" and e["_SYSTEMD_UNIT"] == "oddaemon.service" for e in story)
    # the daemon's other lines are still in the unit's journal, without the field
    everything = inst.sh("journalctl --no-pager -q -u oddaemon.service -o json --output-fields=MESSAGE,ODDAEMON_JOB",
                         check=False).stdout
    assert any(json.loads(line).get("MESSAGE", "").startswith("INFO ready: spool ") for line in everything.splitlines())
