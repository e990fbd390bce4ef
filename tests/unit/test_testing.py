"""The test helpers' real servers (stepdpo/testing.py)."""

from __future__ import annotations

import pytest

from stepdpo.testing import VLLMServer


def test_a_server_that_fails_to_start_says_where_to_look_and_closes_its_files(tmp_path):
    # Each start opens the URL pipe and the log; a server stopped (or killed) and started again used to leave the
    # last start's open (ResourceWarning). A start that fails at once exercises the same path in a second.
    log = tmp_path / "vllm.log"
    server = VLLMServer(tmp_path / "missing", "judge", log).start()
    with pytest.raises(RuntimeError, match=f"did not come up: ''; see {log}"):
        server.wait()
    assert server.proc.stdout.closed and server._log.closed
    assert "model directory" in log.read_text() and "does not exist" in log.read_text()
