"""The vLLM client against a small real HTTP server on 127.0.0.1 that misbehaves on purpose."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stepdpo.reward.vllm import (BadRequest, MalformedResponse, RetryBudgetExhausted, ServerUnreachable,
                                 VLLMClient)


class Script:
    """What the fake server answers, request after request."""

    def __init__(self):
        self.answers = []  # list of (status, body), "hang", "drop" or "cut"
        self.default = (200, None)
        self.seen = []
        self.lock = threading.Lock()

    def next(self):
        with self.lock:
            return self.answers.pop(0) if self.answers else self.default


def completions_body(payload):
    choices = []
    for i, prompt in enumerate(payload["prompt"]):
        logprobs = [None] + [{str(t): {"logprob": -0.5 - 0.01 * t, "rank": 1}} for t in prompt[1:]]
        choices.append({"index": i, "prompt_logprobs": logprobs})
    return {"choices": list(reversed(choices))}  # out of order on purpose: the client must reassemble


def _serve(script: Script, port: int = 0):

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _answer(self, payload):
            script.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "payload": payload})
            answer = script.next()
            if answer == "hang":
                time.sleep(3)
                return
            if answer == "drop":  # the connection closes with no answer, as when a server is killed mid-request
                self.close_connection = True
                return
            if answer == "cut":  # the server dies halfway through its answer
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"choices": [')
                self.close_connection = True
                return
            status, body = answer
            if body is None and payload is not None:
                body = getattr(script, "body", completions_body)(payload)
            raw = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._answer(None)

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            self._answer(json.loads(self.rfile.read(n)))

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    return httpd


@pytest.fixture
def make_server():
    started = []

    def make(port: int = 0) -> Script:
        script = Script()
        started.append(_serve(script, port))
        return script

    yield make
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(make_server):
    return make_server()


def client(url, **kw):
    kw.setdefault("backoff", 0.01)
    return VLLMClient([url] if isinstance(url, str) else url, "m", **kw)


def test_503_then_200_is_retried(server):
    server.answers = [(503, {"error": "busy"}), (429, {"error": "slow down"})]
    c = client(server.url)
    assert c.last_token_logprobs(server.url, [[1, 2, 3]]) == [pytest.approx(-0.53)]
    assert c.retries == 2 and c.requests_sent == 3


def test_hanging_route_times_out_and_spends_the_budget(server):
    server.answers = ["hang", "hang"]
    c = client(server.url, read_timeout=0.3, max_retries=1)
    start = time.monotonic()
    with pytest.raises(RetryBudgetExhausted, match=server.url.replace(".", r"\.")):
        c.last_token_logprobs(server.url, [[1, 2]])
    assert time.monotonic() - start < 2.5


def test_an_answer_cut_short_is_a_lost_server_not_a_traceback(server):
    server.answers = ["cut"]  # requests raises ChunkedEncodingError, which is no ConnectionError
    with pytest.raises(ServerUnreachable, match="connection broke \\(ChunkedEncodingError\\)"):
        client(server.url).last_token_logprobs(server.url, [[1, 2]])


def test_garbage_json_is_a_typed_error(server):
    server.answers = [(200, b"<html>not json")]
    with pytest.raises(MalformedResponse, match="not JSON"):
        client(server.url).last_token_logprobs(server.url, [[1, 2]])


def test_wrong_shape_is_a_typed_error_not_a_keyerror(server):
    server.answers = [(200, {"choices": [{"index": 0, "text": "x"}]})]
    with pytest.raises(MalformedResponse, match="unexpected answer shape"):
        client(server.url).last_token_logprobs(server.url, [[1, 2]])
    server.answers = [(200, {"data": [{"index": 0}]})]
    with pytest.raises(MalformedResponse):
        client(server.url).step_pooling(server.url, [[1, 2]])


def test_client_errors_are_not_retried(server):
    server.answers = [(400, {"error": "bad"})]
    c = client(server.url)
    with pytest.raises(BadRequest, match="HTTP 400"):
        c.last_token_logprobs(server.url, [[1, 2]])
    assert c.requests_sent == 1


def test_unreachable_url_fails_within_seconds():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(ServerUnreachable, match=f"127.0.0.1:{port}"):
        client(url).last_token_logprobs(url, [[1, 2]])
    with pytest.raises(ServerUnreachable, match="not healthy"):
        client(url).wait_healthy(deadline_s=0.5, poll_s=0.1)
    assert time.monotonic() - start < 5


def test_health_wait_sees_a_server_become_ready(server):
    server.answers = [(503, {}), (503, {})]
    client(server.url).wait_healthy(deadline_s=5, poll_s=0.05)
    assert [s["path"] for s in server.seen] == ["/health"] * 3


def test_api_key_is_a_header_and_not_in_repr(server):
    c = client(server.url, api_key="sk-secret-123")
    c.last_token_logprobs(server.url, [[1, 2]])
    assert server.seen[0]["auth"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(c)


def test_batches_are_sharded_and_reassembled_in_order(make_server):
    a, b = make_server(), make_server()
    c = client([a.url, b.url], concurrency=3)
    batches = [[[1, 10 + i, 20 + i]] for i in range(12)]
    finished = []
    out = c.map_batches(batches, c.last_token_logprobs, on_result=lambda i, r: finished.append(i))
    assert out == [[pytest.approx(-0.5 - 0.01 * (20 + i))] for i in range(12)]
    assert sorted(finished) == list(range(12))
    assert len(a.seen) == len(b.seen) == 6  # round-robin over the replicas


def _dead_url() -> str:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_concurrency_is_capped_per_url(make_server):
    a, b = make_server(), make_server()
    in_flight = {a.url: 0, b.url: 0}
    peak = {a.url: 0, b.url: 0}
    lock = threading.Lock()
    c = client([a.url, b.url], concurrency=2)

    def slow(url, batch):  # counts what reaches each server at once (the client's own counter aside)
        with lock:
            in_flight[url] += 1
            peak[url] = max(peak[url], in_flight[url])
        try:
            time.sleep(0.05)
            return c.last_token_logprobs(url, batch)
        finally:
            with lock:
                in_flight[url] -= 1

    # a.url gets the even batches, b.url the odd ones; 4 workers would all pile onto one URL without the cap
    c.map_batches([[[1, 2, 3]] for _ in range(16)], slow)
    assert peak == {a.url: 2, b.url: 2} and c.max_in_flight == peak


def test_a_failing_url_hands_its_batches_to_the_others(make_server):
    good = make_server()
    dead = _dead_url()
    c = client([dead, good.url], concurrency=2)
    batches = [[[1, 10 + i, 20 + i]] for i in range(10)]
    out = c.map_batches(batches, c.last_token_logprobs)
    assert out == [[pytest.approx(-0.5 - 0.01 * (20 + i))] for i in range(10)]  # nothing lost, still in order
    assert len(good.seen) == 10
    stats = c.url_stats
    assert stats[dead]["in_rotation"] is False and stats[dead]["batches"] == 0
    assert 2 <= stats[dead]["failed_over"] <= 5  # taken out of rotation after 2 failures in a row
    assert stats[good.url]["batches"] == 10 and c.dead == {dead}


def test_a_replica_that_comes_back_is_put_back_in_rotation(make_server, caplog):
    # One of two replicas is killed and restarted under a long run: once it answers /health again it takes
    # batches again, instead of leaving the other replica to carry the rest of the run alone.
    good, gone = make_server(), _dead_url()
    port = int(gone.rsplit(":", 1)[1])
    revived, lock = [], threading.Lock()
    c = client([gone, good.url], concurrency=1, readmit_poll=0.05)

    def call(url, batch):
        time.sleep(0.01)
        with lock:  # both batch threads may see it out of rotation; only one restarts it
            if not revived and gone in c.dead:  # restarted only once it is out of rotation
                revived.append(make_server(port))
        return c.last_token_logprobs(url, batch)

    batches = [[[1, 10 + i, 20 + i]] for i in range(60)]
    with caplog.at_level("WARNING", logger="stepdpo.vllm"):
        out = c.map_batches(batches, call)
    assert out == [[pytest.approx(-0.5 - 0.01 * (20 + i))] for i in range(60)]
    stats = c.report()["per_url"]
    assert stats[gone]["readmitted"] == 1 and stats[gone]["in_rotation"] is True and c.dead == set()
    assert stats[gone]["batches"] == len(revived[0].seen) - 1 > 10  # its share again (one probe is a GET)
    assert stats[gone]["batches"] + stats[good.url]["batches"] == 60
    assert f"{gone} answers /health again; back in rotation" in [r.getMessage() for r in caplog.records]


def test_a_batch_may_go_back_to_a_replica_it_failed_on_once_that_replica_is_back(make_server):
    # The batch fails on A (down), then on B (which goes down while A comes back): A is in rotation again, so the
    # batch goes there instead of giving up (with --reconnect-timeout 0 there is no outage wait to rescue it).
    other, a = make_server(), _dead_url()
    port = int(a.rsplit(":", 1)[1])
    revived = []
    c = client([a, other.url], fail_after=1, readmit_poll=0.05)

    def call(url, batch):
        if url == other.url:
            revived.append(make_server(port))
            time.sleep(0.1)  # A's readmission probe is due by the time this batch looks for a URL again
            raise ServerUnreachable(f"{url}: connection failed (ConnectionError); is the server up?")
        return c.last_token_logprobs(url, batch)

    assert c.map_batches([[[1, 2, 3]]], call) == [[pytest.approx(-0.53)]]
    assert c.url_stats[a]["batches"] == 1 and c.url_stats[a]["readmitted"] == 1


def test_a_silent_replica_is_probed_less_and_less_often(make_server):
    # A replica whose host drops packets, or whose server hangs, costs the batch that probes it a timeout. Each
    # probe that times out doubles the interval (up to 8 x readmit_poll) and waits connect_timeout for the
    # answer, not 10 s; before, such a host cost a batch 10 s every readmit_poll.
    good, gone = make_server(), _dead_url()
    port = int(gone.rsplit(":", 1)[1])
    silent, probes, held, lock = socket.socket(), [], [], threading.Lock()
    c = client([gone, good.url], concurrency=1, readmit_poll=0.05, connect_timeout=0.2)
    start = time.monotonic()

    def accept():  # accepts and never answers, like a hung server
        while True:
            try:
                conn, _ = silent.accept()
            except OSError:
                return
            probes.append(time.monotonic())
            held.append(conn)

    def call(url, batch):
        time.sleep(0.01)
        if time.monotonic() - start > 20:  # it takes about 3 s
            raise AssertionError("probing the silent replica held up the run")
        with lock:
            if gone in c.dead and not silent.getsockname()[1]:  # it comes back silent once out of rotation
                silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                silent.bind(("127.0.0.1", port))
                silent.listen()
                threading.Thread(target=accept, daemon=True).start()
        return c.last_token_logprobs(url, batch)

    try:
        c.map_batches([[[1, 2, 3]]] * 250, call)  # 2.5 s or more of batches of 10 ms
    finally:
        silent.close()
        for conn in held:
            conn.close()
    took = time.monotonic() - start
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert len(probes) >= 3 and c.url_stats[gone]["readmitted"] == 0
    # each gap is at least the grown interval plus the probe's own 0.2 s, less the accepting thread's scheduling delay:
    # a probe accepted late shortens the next gap (a loaded CI machine gave 0.3997 s for 0.4). Without the back-off
    # every gap would be about 0.25 s, below the third gap's bound of 0.5 and every later one's.
    jitter = 0.1
    assert all(g >= min(2 ** (k + 1), 8) * 0.05 + 0.2 - jitter for k, g in enumerate(gaps)), gaps
    assert len(gaps) >= 2 and max(gaps[1:]) >= 0.4 + 0.2 - jitter, gaps  # it did grow
    assert len(probes) <= 2 + took / (8 * 0.05 + 0.2)


def test_a_url_that_leaves_again_is_probed_at_the_first_interval_again(make_server):
    # A URL that backed off (silent, then readmitted, here by the outage wait, which does not reset the probe
    # interval) and leaves the rotation again starts over at readmit_poll, not at its grown interval.
    good, gone = make_server(), _dead_url()
    c = client([gone, good.url], readmit_poll=10.0)
    c._probe_every[gone] = 80.0  # as if it had been silent
    before = time.monotonic()
    c.map_batches([[[1, 2, 3]]] * 4, c.last_token_logprobs)
    assert gone in c.dead and gone not in c._probe_every
    assert before + 10.0 <= c._next_probe[gone] <= time.monotonic() + 10.0


class _SilentHost:
    """A port whose connections are never made, as on a host that is powered off and drops packets: a listening
    socket with a backlog of 0 that never accepts, its one queue slot taken, so the kernel drops further SYNs and
    a client's connect times out (not refused). `close` frees the port for a real server."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # so that a server can take the port after
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=1)

    def close(self):
        self.filler.close()
        self.sock.close()


def test_a_host_that_drops_packets_is_probed_and_readmitted_once_it_answers(make_server):
    # Before, connect timeouts spent the retry budget and the URL left as a failing one (like 5xx), never probed:
    # a replica whose node was down for a while stayed idle for the rest of the run.
    silent, good = _SilentHost(), make_server()
    revived, lock = [], threading.Lock()
    c = client([silent.url, good.url], concurrency=1, max_retries=1, connect_timeout=0.2, readmit_poll=0.05)

    def call(url, batch):
        time.sleep(0.01)
        with lock:  # both batch threads may see it out of rotation; only one restarts it
            if not revived and silent.url in c.dead:  # the node comes back once its URL is out of rotation
                silent.close()
                revived.append(make_server(silent.port))
        return c.last_token_logprobs(url, batch)

    try:
        out = c.map_batches([[[1, 10 + i, 20 + i]] for i in range(60)], call)
    finally:
        silent.close()
    assert out == [[pytest.approx(-0.5 - 0.01 * (20 + i))] for i in range(60)]
    assert isinstance(c._last_error[silent.url], ServerUnreachable)
    assert "no connection within 0.2 s, 2 times (connect timeout); is the host up?" in str(c._last_error[silent.url])
    stats = c.url_stats[silent.url]
    assert stats["readmitted"] == 1 and stats["in_rotation"] is True and stats["batches"] > 10


def test_a_lone_host_that_drops_packets_is_waited_for_like_one_that_refuses(make_server):
    # Before, its connect timeouts spent the retry budget and the run stopped: the outage wait was only for servers
    # that refuse.
    silent = _SilentHost()
    c = client(silent.url, max_retries=1, connect_timeout=0.2, reconnect_timeout=30, reconnect_poll=0.05)

    def revive():  # the node comes back once the batch has given up on it
        while not c.url_stats[silent.url]["failures"]:
            time.sleep(0.01)
        silent.close()
        make_server(silent.port)

    threading.Thread(target=revive, daemon=True).start()
    try:
        assert c.map_batches([[[1, 2, 3]]], c.last_token_logprobs) == [[pytest.approx(-0.53)]]
    finally:
        silent.close()
    assert c.reconnects == 1 and c.requests_sent == 3  # two connect timeouts, then the answer


def test_when_every_url_fails_the_error_names_a_url():
    c = client([_dead_url(), _dead_url()])
    with pytest.raises(ServerUnreachable, match="127.0.0.1"):
        c.map_batches([[[1, 2]]] * 3, c.last_token_logprobs)


def test_a_batch_that_finds_every_url_out_of_rotation_names_them_all():
    # With batches in flight together, other batches can take every URL out of rotation before this one
    # tries any; it then has no error of its own to raise (this was a `TypeError` in CI). A second call on
    # the same client makes that order certain.
    urls = [_dead_url(), _dead_url()]
    c = client(urls, fail_after=1)
    with pytest.raises(ServerUnreachable):
        c.map_batches([[[1, 2]]], c.last_token_logprobs)
    assert c.dead == set(urls)
    with pytest.raises(ServerUnreachable, match="every vLLM URL failed") as e:
        c.map_batches([[[1, 2]]] * 2, c.last_token_logprobs)
    assert all(f"{u}: connection failed" in str(e.value) for u in urls)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), True, 0.5, "x"])
def test_non_finite_or_impossible_logprobs_are_refused(server, bad):
    body = {"choices": [{"index": 0, "prompt_logprobs": [None, {"2": {"logprob": bad}}]}]}
    server.answers = [(200, body)]  # json.dumps writes NaN/Infinity literals, as a broken server would
    with pytest.raises(MalformedResponse, match=server.url.replace(".", r"\.")):
        client(server.url).last_token_logprobs(server.url, [[1, 2]])


def test_a_server_that_comes_back_is_waited_for_and_the_run_continues(make_server, caplog):
    # A killed server restarted on its port: connection refused, then a server again. Every batch arrives.
    url = _dead_url()
    port = int(url.rsplit(":", 1)[1])
    threading.Timer(0.5, make_server, args=(port,)).start()
    c = client(url, concurrency=2, reconnect_timeout=30, reconnect_poll=0.05)
    with caplog.at_level("WARNING", logger="stepdpo.vllm"):
        out = c.map_batches([[[1, 10 + i, 20 + i]] for i in range(4)], c.last_token_logprobs)
    assert out == [[pytest.approx(-0.5 - 0.01 * (20 + i))] for i in range(4)]
    assert c.reconnects == 1 and 0.3 < c.waited_s < 10  # one outage, told once, however many batches waited
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert f"lost the vLLM server ({url}: connection failed" in warnings[0] and "up to 30 s" in warnings[0]
    assert warnings[1].startswith(f"{url} answers again after")
    assert c.report()["reconnects"] == 1 and c.report()["per_url"][url]["batches"] == 4


def test_a_server_that_stays_away_fails_once_the_outage_outlasts_the_timeout():
    url = _dead_url()
    c = client(url, concurrency=3, reconnect_timeout=1, reconnect_poll=0.05)
    start = time.monotonic()
    with pytest.raises(ServerUnreachable, match=r"none answered /health again within 1 s \(--reconnect-timeout\)"):
        c.map_batches([[[1, 2]]] * 6, c.last_token_logprobs)
    # The deadline is the outage's: the six batches do not each wait a second in turn.
    assert 1 <= time.monotonic() - start < 3 and c.reconnects == 0


def test_a_server_that_answers_5xx_is_not_waited_for(server):
    server.default = (503, {"error": "overloaded"})  # up and answering /health with 503 too: waiting cannot help
    c = client(server.url, max_retries=1, reconnect_timeout=30, reconnect_poll=0.05)
    start = time.monotonic()
    with pytest.raises(RetryBudgetExhausted, match="gave up after 2 attempts"):
        c.map_batches([[[1, 2]]], c.last_token_logprobs)
    assert time.monotonic() - start < 5


def test_a_batch_that_fails_for_good_stops_the_others_waiting():
    # Another batch's error (or Ctrl-C) ends the run: a batch polling for a lost server must not hold the
    # exit for the whole reconnect timeout.
    url = _dead_url()

    def call(u, batch):
        if batch == "bad":
            time.sleep(0.3)
            raise BadRequest(f"{u}/v1/completions: HTTP 400: bad")
        raise ServerUnreachable(f"{u}: connection failed (ConnectionError); is the server up?")

    c = client(url, concurrency=2, reconnect_timeout=30, reconnect_poll=0.05)
    start = time.monotonic()
    with pytest.raises(BadRequest):
        c.map_batches(["gone", "bad"], call)
    assert time.monotonic() - start < 5
