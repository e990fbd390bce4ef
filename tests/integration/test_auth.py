"""Hugging Face auth: a local HTTP server stands in for the hub (HF_ENDPOINT). The preflight tells the
failures apart and stops launch/train.sh before any worker starts; the token never leaks."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import REPO, child_env
from stepdpo.testing import free_port

pytestmark = pytest.mark.integration
FAKE = "hf_FakeTokenAbCdEf0123456789xyz"


@pytest.fixture(scope="module")
def hub():
    seen = []

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            auth = self.headers.get("Authorization", "")
            seen.append((self.path, auth))
            repo = self.path.removeprefix("/api/models/").removesuffix("/auth-check")
            if repo == "acme/open":
                return self._send(200, {})
            if repo == "acme/gated":
                # the hub answers 401 without a token and 403 with one that has not accepted the licence
                return self._send(403 if auth else 401, {"error": "Access to model acme/gated is restricted."},
                                  "GatedRepo")
            if repo == "acme/private":
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            return self._send(404, {"error": "Repository not found"}, "RepoNotFound")

        def do_HEAD(self):  # file metadata, as a download asks it: recorded, never found
            seen.append((self.path, self.headers.get("Authorization", "")))
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send(self, status, body, code=None):
            raw = json.dumps(body).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", body["error"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "seen": seen}
    httpd.shutdown()


def launch(model, hub_url, tmp_path, token=FAKE, extra_env=None):
    recipe = REPO / "configs" / "recipes" / "tiny" / "mistral_cpu.yaml"
    env = child_env(**{"HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                       "HF_HOME": tmp_path / "hf_home",
                       **(extra_env or {})})
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(["bash", str(REPO / "launch" / "train.sh"), "--mode", "cpu", "--config", str(recipe),
                           "--", "--model_name_or_path", model, "--output_dir", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("model, token, kind, words", [
    ("acme/gated", FAKE, "gated", ["accept the licence at", "/acme/gated", "HF_TOKEN"]),
    ("acme/gated", None, "no_token", ["no Hugging Face token was found", "HF_TOKEN"]),
    ("acme/private", FAKE, "bad_token", ["rejected (401)", "invalid or expired"]),
    ("acme/missing", FAKE, "not_found", ["not found on http://127.0.0.1"]),
])
def test_preflight_failures_stop_before_any_worker(model, token, kind, words, hub, tmp_path):
    res = launch(model, hub["url"], tmp_path, token=token)
    out = res.stdout + res.stderr
    assert res.returncode == 3, out
    assert f"stepdpo preflight: {kind}:" in out
    for w in words:
        assert w in out
    assert "[train.sh] mode=" not in out and "accelerate" not in out.lower()  # no worker was started
    assert not (tmp_path / "out").exists()
    assert FAKE not in out


def test_token_is_sent_to_the_hub_as_a_header(hub, tmp_path):
    launch("acme/gated", hub["url"], tmp_path)
    assert ("/api/models/acme/gated/auth-check", f"Bearer {FAKE}") in hub["seen"]


def test_unreachable_hub(tmp_path):
    res = launch("acme/open", f"http://127.0.0.1:{free_port()}", tmp_path)
    assert res.returncode == 3 and "unreachable" in res.stderr and FAKE not in res.stderr


def test_offline_without_cache(tmp_path):
    res = launch("acme/open", "http://127.0.0.1:9", tmp_path, extra_env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 3 and "offline_not_cached" in res.stderr and "HF_HUB_OFFLINE=1" in res.stderr


def test_accessible_repo_passes(hub, tmp_path):
    import sys

    env = child_env(HF_ENDPOINT=hub["url"], HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_TOKEN=FAKE, HF_HOME=tmp_path)
    res = subprocess.run([sys.executable, "-m", "stepdpo.auth", "--model_name_or_path", "acme/open"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "acme/open: accessible with token from HF_TOKEN" in res.stderr
    assert FAKE not in res.stderr


def test_token_never_reaches_argv_logs_or_files(tiny_mistral, synth_pairs, tmp_path):
    """A real (local) training run with a token in the environment and a token file: the token is in no
    output, no file of the run directory, and not in the launch command line."""
    token_file = tmp_path / "token"
    token_file.write_text(FAKE + "\n")
    recipe = REPO / "configs" / "recipes" / "tiny" / "mistral_cpu.yaml"
    out_dir = tmp_path / "run"
    args = ["bash", str(REPO / "launch" / "train.sh"), "--mode", "cpu", "--config", str(recipe), "--hf-token-file",
            str(token_file), "--", "--model_name_or_path", str(tiny_mistral), "--train_pairs",
            str(synth_pairs / "train" / "pairs.jsonl"), "--output_dir", str(out_dir), "--max_steps", "2",
            "--save_strategy", "steps", "--save_steps", "1"]
    env = child_env(HF_TOKEN=FAKE, MAIN_PORT=free_port())
    dry = subprocess.run(args[:2] + ["--dry-run"] + args[2:], env=env, capture_output=True, text=True, check=True)
    assert "--hf_token_file" in dry.stdout and FAKE not in dry.stdout
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert FAKE not in res.stdout + res.stderr
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and any(p.name == "trainer_state.json" for p in files)
    for p in files:
        assert FAKE.encode() not in p.read_bytes(), p


def _direct(args, hub_url, tmp_path, token=FAKE, extra_env=None):
    """`stepdpo train` run directly (no launch/train.sh): the training entry's own preflight."""
    import sys

    env = child_env(**{"HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                       "HF_HOME": tmp_path / "hf_home", **(extra_env or {})})
    env.pop("HF_TOKEN", None)
    env.pop("STEPDPO_PREFLIGHT_DONE", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("entry", [["-m", "stepdpo.cli", "train"], ["-m", "stepdpo.train.run"]],
                         ids=["stepdpo-train", "python-m-run"])
def test_training_entry_runs_the_preflight_itself(entry, hub, synth_pairs, tmp_path):
    res = _direct([*entry, "--model_name_or_path", "acme/gated", "--train_pairs",
                   str(synth_pairs / "train" / "pairs.jsonl"), "--output_dir", str(tmp_path / "out"), "--use_cpu",
                   "true", "--report_to", "none"], hub["url"], tmp_path)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "accept the licence at" in res.stderr and "Traceback" not in res.stderr
    assert FAKE not in res.stdout + res.stderr


def test_anonymous_misspelling_is_not_called_a_token_problem(tmp_path):
    """Anonymous, the hub answers 401 "repository not found" for a misspelled and a private repo alike."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Anonymous(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            raw = b'{"error": "Repository not found"}'
            self.send_response(401)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Anonymous)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        res = _direct(["-m", "stepdpo.auth", "--model_name_or_path", "mistrali/Mistral-7B-v0.1"],
                      f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path, token=None)
    finally:
        httpd.shutdown()
    assert res.returncode == 3 and "not_found_or_private" in res.stderr and "Check the spelling" in res.stderr


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "ON"}, {"TRANSFORMERS_OFFLINE": "1"}])
def test_every_offline_switch_is_honoured(env, tmp_path):
    res = _direct(["-m", "stepdpo.auth", "--model_name_or_path", "acme/open"], "http://127.0.0.1:9", tmp_path,
                  extra_env=env)
    assert res.returncode == 3 and "offline_not_cached" in res.stderr


def test_a_silent_hub_times_out(tmp_path):
    import socket
    import time

    with socket.socket() as s:  # accepts connections, never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        start = time.monotonic()
        res = _direct(["-m", "stepdpo.auth", "--model_name_or_path", "acme/open"],
                      f"http://127.0.0.1:{s.getsockname()[1]}", tmp_path,
                      extra_env={"STEPDPO_PREFLIGHT_TIMEOUT": "3"})
        assert res.returncode == 3 and "did not answer within 3 s" in res.stderr
        assert time.monotonic() - start < 30


def test_token_file_under_xdg_cache_home(tmp_path):
    import os

    from stepdpo.auth import resolve_token

    (tmp_path / "huggingface").mkdir()
    (tmp_path / "huggingface" / "token").write_text(FAKE)
    saved = {k: os.environ.pop(k, None) for k in ("HF_TOKEN", "HF_HOME", "HF_TOKEN_PATH")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path)
    try:
        token = resolve_token()
    finally:
        os.environ.pop("XDG_CACHE_HOME")
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    assert token.value == FAKE and str(tmp_path) in token.source


_STAGES = """
import contextlib, io, json, sys
from stepdpo.cli import main

results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results[name] = [rc, err.getvalue()]
print(json.dumps(results))
"""


def test_every_stage_that_loads_a_model_by_name_runs_the_preflight_first(hub, tiny_mistral, synth_pairs, tmp_path):
    """generate, mine (policy and reward model), score, eval, inspect and merge: a gated hub id stops the stage
    before any work with the preflight's one line, naming where the id came from. Before, transformers' download
    error came through with advice about paths and free space (and, with the hub unreachable, after about 50 s of
    retries). And train and sft call a model path that does not exist by that name (before: "the hub is
    unreachable", or the hub's own error). One process runs every stage's CLI, so the imports are paid for once."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"problem": "Start with 3. Add 4.", "answer": "7"}) + "\n")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "acme/gated",
                                                             "peft_type": "LORA"}))
    pairs = str(synth_pairs / "train" / "pairs.jsonl")
    out = lambda name: ["--out", str(tmp_path / name)]  # noqa: E731
    stages = {
        "generate": ["generate", "--problems", str(problems), "--model", "acme/gated", *out("g")],
        "mine": ["mine", "--problems", str(problems), "--model", str(tiny_mistral), "--locate", "prm",
                 "--reward-model", "acme/gated", *out("m")],
        "score": ["score", "--pairs", pairs, "--model", "acme/gated", *out("s")],
        "eval": ["eval", "--pairs", pairs, "--model", str(adapter), *out("e")],
        "inspect": ["inspect", "--pairs", pairs, "--model", "acme/gated"],
        "merge": ["merge", "--adapter", str(adapter), *out("merged")],
        "train": ["train", "--model_name_or_path", "./nope", "--train_pairs", pairs, "--output_dir", str(tmp_path / "t"),
                  "--use_cpu", "true", "--report_to", "none"],
        "sft": ["sft", "--model_name_or_path", "./nope", "--train_data", str(problems), "--output_dir",
                str(tmp_path / "sft"), "--use_cpu", "true", "--report_to", "none"],
    }
    res = _direct(["-c", _STAGES, json.dumps(stages)], hub["url"], tmp_path, token=None)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.splitlines()[-1])
    named = {"generate": "--model acme/gated", "mine": "--reward-model acme/gated", "score": "--model acme/gated",
             "eval": f"acme/gated (the base model in {adapter}/adapter_config.json)", "inspect": "--model acme/gated",
             "merge": f"acme/gated (the base model in {adapter}/adapter_config.json)"}
    for stage in ("train", "sft"):
        rc, err = results.pop(stage)
        assert rc == 2 and err.strip().splitlines()[-1] == (
            f"stepdpo {stage}: error: --model_name_or_path ./nope: no such model directory"), (stage, err)
    for stage, (rc, err) in results.items():
        assert rc == 3, (stage, err)
        assert err.strip() == (f"stepdpo {stage}: error: {named[stage]} is gated and no Hugging Face token was found. "
                               "Set HF_TOKEN, run `hf auth login`, or pass --hf-token-file; then accept the licence "
                               f"at {hub['url']}/acme/gated."), (stage, err)
    for d in ("m", "merged", "t", "sft"):  # stopped before any work
        assert not (tmp_path / d).exists(), d


def test_an_unreachable_hub_does_not_stop_a_stage_with_a_cached_copy(tmp_path):
    """Unreachable and cached: the stage loads the cached copy, as transformers would (with a warning on how to
    skip the hub); unreachable and not cached: the preflight's one line, at once, instead of transformers'
    retries."""
    script = ("import sys\nfrom stepdpo.auth import AuthError, check_model, resolve_token\n"
              "try:\n    check_model('acme/open', resolve_token())\nexcept AuthError as e:\n"
              "    print(e.kind, e)\n    sys.exit(3)\nprint('passed')\n")
    closed = f"http://127.0.0.1:{free_port()}"
    res = _direct(["-c", script], closed, tmp_path)
    assert res.returncode == 3 and res.stdout.startswith("unreachable --model acme/open: the hub at"), res.stdout
    snapshot = tmp_path / "hf_home" / "hub" / "models--acme--open" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    res = _direct(["-c", script], closed, tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "passed", res.stdout + res.stderr
    assert "Loading the cached copy; HF_HUB_OFFLINE=1 skips the hub" in res.stderr


def test_plan_reads_a_bundled_config_without_asking_the_hub(hub, tmp_path):
    """Mistral-7B-v0.1's config is bundled: `stepdpo plan` does not ask the hub for it. Before, it asked first and
    fell back to the copy only when the hub failed, which offline took about 25 s of retries and 24 log lines."""
    res = _direct(["-m", "stepdpo.cli", "plan", "--model", "mistralai/Mistral-7B-v0.1", "--json"], hub["url"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["parameters"] == 7_241_732_096
    assert not [path for path, _ in hub["seen"] if "mistralai" in path]
