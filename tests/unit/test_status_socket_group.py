"""status.group: the status socket's group, set at bind.

Under the shipped systemd unit the daemon may not call chown at all (its
system call filter denies @privileged, of which chown is part), and the
socket is born in the unit's Group= already, which is what README's install
names in status.group. tools/systemd_check.sh runs that case under a real
systemd; here, the same rule without the filter: the socket has the group
asked for, mode 0660, and a group that cannot be used is a config error
naming the key.
"""

from __future__ import annotations

import grp
import os
import stat

import pytest

from daemon.errors import ConfigError
from daemon.supervision.status import bind


def test_the_socket_takes_our_own_group(tmp_path):
    own = grp.getgrgid(os.getegid()).gr_name
    sock = bind(tmp_path / "s.sock", group=own)
    try:
        info = (tmp_path / "s.sock").stat()
        assert info.st_gid == os.getegid()
        assert stat.S_IMODE(info.st_mode) == 0o660
    finally:
        sock.close()


def test_an_unknown_group_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^status.group: cannot use group 'no-"):
        bind(tmp_path / "s.sock", group="no-such-group-here")
    assert not (tmp_path / "s.sock").exists()
