"""vmiso provision's own steps that need no VM (the VM tests provision real images)."""

from __future__ import annotations

import stat

from vmiso.image.provision import new_console_log


def test_two_provisionings_of_one_name_in_one_second_get_a_console_log_each(tmp_path):
    first, second = new_console_log(tmp_path, "it"), new_console_log(tmp_path, "it")
    assert first != second and first.name.startswith("provision-it-") and second.name.startswith("provision-it-")
    assert [stat.S_IMODE(p.stat().st_mode) for p in (first, second)] == [0o600, 0o600]
