"""The child state enum and its groups."""

from daemon.supervision.states import ALIVE_STATES
from daemon.supervision.states import DEAD_STATES
from daemon.supervision.states import DOWN_STATES
from daemon.supervision.states import LEGAL_SOURCES
from daemon.supervision.states import WAITING_STATES
from daemon.supervision.states import ChildState


def test_alive_and_dead_partition_every_state():
    """Verify that every state either has a process or has none, never both."""
    assert ALIVE_STATES | DEAD_STATES == set(ChildState)
    assert not ALIVE_STATES & DEAD_STATES


def test_only_running_is_up():
    """Verify that alerting counts every state but RUNNING as down."""
    assert set(ChildState) - DOWN_STATES == {ChildState.RUNNING}


def test_waiting_states_have_no_process():
    """Verify that the respawn policy only waits on dead children."""
    assert WAITING_STATES <= DEAD_STATES


def test_every_state_is_reachable_and_none_loops_on_itself():
    """Verify that the transition table covers every state without self-moves."""
    assert set(LEGAL_SOURCES) == set(ChildState)
    for new, sources in LEGAL_SOURCES.items():
        assert new not in sources


def test_running_is_reached_only_from_starting():
    """Verify that RUNNING means a heartbeat was seen after a spawn."""
    assert LEGAL_SOURCES[ChildState.RUNNING] == {ChildState.STARTING}


def test_values_are_their_names():
    """Verify that the wire format (status socket) shows plain names."""
    assert all(state.value == state.name for state in ChildState)
