"""zygote.prefork, the fork of the first zygote from `campaignd run`: the
child takes the children's environment, drops the data directory's lock and
reads `child --zygote` in `ps`; with a thread running there is no fork (the
supervisor then exec's its zygote). Each case runs in a fresh interpreter: a
fork must not copy pytest's threads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
import json, os, sys, threading
from daemon import config
from daemon.supervision.zygote import prefork

cfg = config.load(sys.argv[1])
lock = os.open(sys.argv[1], os.O_RDONLY)  # stands for the data dir's lock
if sys.argv[2] == "with a thread":
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
first = prefork(cfg, ("json",), {"ONLY": "this"}, close=(lock,))
if sys.argv[2] == "with a thread":
    stop.set()
    worker.join()
if first is None:
    print(json.dumps({"forked": False}))
    sys.exit(0)
if first.pid == 0:
    try:
        os.fstat(lock)
        lock_open = True
    except OSError:
        lock_open = False
    with open("/proc/self/cmdline", "rb") as f:
        words = [w.decode() for w in f.read().split(b"\\0") if w]
    seen = {"env": dict(os.environ), "lock_open": lock_open, "cmdline": words,
            "own_group": os.getpgid(0) == os.getpid()}
    first.channel.sendall(json.dumps(seen).encode() + b"\\n")
    os._exit(0)
line = first.channel.makefile("rb").readline()
os.waitpid(first.pid, 0)
print(json.dumps({"forked": True, "child": json.loads(line)}))
"""


def run(make_config, how: str) -> dict:
    cfg = make_config()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, cfg.source, how],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_forked_zygote_takes_the_childrens_environment_and_not_the_lock(
    make_config,
):
    seen = run(make_config, "alone")
    assert seen["forked"]
    child = seen["child"]
    assert child["env"] == {"ONLY": "this"}
    assert child["lock_open"] is False
    assert child["own_group"] is True
    assert child["cmdline"][-3:] == ["daemon", "child", "--zygote"]


def test_no_fork_while_a_thread_runs(make_config):
    assert run(make_config, "with a thread") == {"forked": False}
