"""End-to-end behaviour on the PostgreSQL store: existing end-to-end tests, run again with ``database_url`` on PostgreSQL.

The tests are imported unchanged from their modules (pytest collects them here too) and run against
this module's ``settings``, which names a new database on the test run's throwaway server
(``tests/pgserver.py``): Send to a real MQTT device and its final status, PUBACK and DELIVERED,
the TTL, the outbox on reconnect, late and duplicate answers, cancel, SendStream, and Stream's
live events, replay and resumption while events are being produced.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Settings
from tests import pgserver
from tests.conftest import make_settings
from tests.test_device_contract import (  # noqa: F401 - collected and run here on PostgreSQL
    test_cancel_queued_execution,
    test_delivered_after_puback_without_answer,
    test_different_final_after_final_is_late,
    test_duplicate_final_response_is_idempotent,
    test_in_progress_then_succeeded,
    test_offline_device_gets_queued_command_on_connect,
    test_request_shape_and_success,
    test_response_after_timeout_is_late,
    test_ttl_expiry_with_silent_device,
    test_unacked_request_is_published_again_on_reconnect,
)
from tests.test_send_stream import (  # noqa: F401
    test_idempotency_key_reuse_behaves_as_unary_send,
    test_many_items_on_one_stream_are_committed_and_answered_by_request_id,
)
from tests.test_smoke import test_send_to_connected_device_succeeds  # noqa: F401
from tests.test_stream import (  # noqa: F401
    test_after_sequence_zero_replays_the_whole_log,
    test_filters_thing_execution_and_action,
    test_live_events_for_send_and_cancel,
    test_resume_replays_after_n_then_continues_live,
    test_resume_while_events_are_produced_concurrently,
)


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """As conftest's ``settings``, on a new PostgreSQL database."""
    secure = request.node.get_closest_marker("secure") is not None
    return make_settings(tmp_path / "data", allow_anonymous=not secure, database_url=pgserver.fresh_database_url())
