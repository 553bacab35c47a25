"""A bug on purpose, in the daemon the console test starts (on PYTHONPATH).

The status handler raises for the reference "cd-poison" while the file named
by CAMPAIGND_TEST_POISON_FLAG exists, like the failing_find_message of
tests/integration/test_dead_letters.py but across processes: the worker that
processes that webhook fails, the event becomes a dead letter, and deleting
the file is "the fix" before the operator presses Replay. Without the
variable this file does nothing.
"""

import os

_FLAG = os.environ.get("CAMPAIGND_TEST_POISON_FLAG")
POISON_REFERENCE = "cd-poison"

if _FLAG:
    from daemon.domain import campaigns

    _real_find = campaigns.find_message

    def _find(reference=None, provider_id=None, wa_id=None):
        if reference == POISON_REFERENCE and os.path.exists(_FLAG):
            raise RuntimeError(f"cannot handle reference {reference}")
        return _real_find(reference, provider_id, wa_id)

    campaigns.find_message = _find
