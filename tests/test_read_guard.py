"""The guard that keeps a test's verdict independent of what else a machine has (`read_guard`)."""

from __future__ import annotations

import os
import sysconfig

import pytest

from conftest import READ_GUARD
from read_guard import REPOSITORY, ReadGuard


NOWHERE = "/zip2zip-hf-nowhere"  # outside every allowed place, and on no machine


def test_a_file_opened_or_a_folder_listed_outside_is_recorded_once():
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            open(f"{NOWHERE}/library/lib.rs")
    with pytest.raises(FileNotFoundError):
        os.listdir(NOWHERE)
    # Taken here, so that the check after each test (conftest) does not fail this one.
    assert READ_GUARD.take() == [("open", f"{NOWHERE}/library/lib.rs"), ("os.listdir", NOWHERE)]


def test_the_checkout_the_interpreter_and_the_temporary_folder_are_read_freely(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert (tmp_path / "a.txt").read_text() == "x"
    assert "setup.cfg" in os.listdir(REPOSITORY)
    assert (os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")) and os.listdir(sysconfig.get_paths()["stdlib"])
    assert READ_GUARD.take() == []


def test_a_link_that_leads_outside_is_outside(tmp_path):
    guard = ReadGuard((str(tmp_path.resolve() / "allowed"),))
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "out").symlink_to(NOWHERE)
    assert guard.allows(str(tmp_path / "allowed" / "file.py"))
    assert not guard.allows(str(tmp_path / "allowed" / "out" / "file.py"))
    assert not guard.allows(str(tmp_path / "allowed-too"))  # a sibling whose name starts the same
    assert guard.allows(str(tmp_path / "allowed"))


def test_a_system_file_is_read_wherever_its_link_leads(tmp_path):
    guard = ReadGuard((str(tmp_path.resolve()),))
    assert guard.allows("/etc/os-release")  # a link into /usr/lib on Debian
    assert not guard.allows("/usr/lib/os-release")
