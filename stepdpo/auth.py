"""Hugging Face token handling and the gated-model preflight.

Token sources, first found wins: `--hf-token-file FILE`, the `HF_TOKEN` environment variable, the
standard token file (`$HF_HOME/token`, `~/.cache/huggingface/token`). The token is passed to
huggingface_hub / transformers calls as an argument and through the environment of child processes,
never on a command line, and `mask()` hides it in any text that is logged or saved.

`preflight()` tells apart: no or invalid token (401), gated repo whose licence the token's account has not
accepted (403), not found (404), hub unreachable, and offline mode without a cached copy. `check_model()` runs
it for a model (and refuses a model path that does not exist) before any training worker starts, and at the
start of every other stage that loads a model by name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


from stepdpo.errors import OptionsError, StepdpoError

# The hub must answer the preflight within this many seconds (connect + read), else it counts as unreachable.
PREFLIGHT_TIMEOUT = float(os.environ.get("STEPDPO_PREFLIGHT_TIMEOUT", "20"))


class AuthError(StepdpoError, RuntimeError):
    """A preflight failure with an actionable message (never containing the token); exit status 3."""

    exit_code = 3

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def _standard_token_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")
    return Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token"))


@dataclass
class Token:
    value: str | None
    source: str  # where it came from, safe to print

    def __repr__(self) -> str:  # never show the value, even in a traceback or a debugger
        return f"Token(source={self.source!r}, value={'***' if self.value else None})"


def resolve_token(token_file: str | None = None) -> Token:
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise AuthError("token_file", f"--hf-token-file {path}: no such file")
        value = path.read_text(encoding="utf-8").strip()
        if not value:
            raise AuthError("token_file", f"--hf-token-file {path} is empty")
        return Token(value, f"file {path}")
    if os.environ.get("HF_TOKEN", "").strip():
        return Token(os.environ["HF_TOKEN"].strip(), "HF_TOKEN")
    path = _standard_token_file()
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        return Token(path.read_text(encoding="utf-8").strip(), f"token file {path}")
    return Token(None, "none")


def mask(text: str, token: Token | str | None = None) -> str:
    """Hide the token (and anything shaped like a HF token) in text bound for a log or a file."""
    value = token.value if isinstance(token, Token) else token
    if value:
        text = text.replace(value, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def is_local(name: str) -> bool:
    return os.path.isdir(os.path.expanduser(name))


def looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`): absolute, relative with ./ or ~, or deeper than one /."""
    name = str(name)
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _offline() -> bool:
    """huggingface_hub's and transformers' offline switches, spelled any way they accept."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def preflight(repo_id: str, token: Token, repo_type: str = "model", revision: str | None = None) -> str:
    """Check that `repo_id` can be loaded with `token`; returns a one-line status, raises AuthError."""
    if is_local(repo_id):
        return f"{repo_id}: local directory"
    if _offline():
        if not _cached(repo_id, revision, repo_type):
            raise AuthError(
                "offline_not_cached",
                f"{repo_id}: HF_HUB_OFFLINE=1 and no cached copy was found. Download it once with hub access "
                f"(huggingface-cli download {repo_id}), or pass a local directory.",
            )
        return f"{repo_id}: cached (offline mode)"
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo_id}" if repo_type == "model" else f"{endpoint}/{repo_type}s/{repo_id}"
    try:
        _bounded(lambda: auth_check(repo_id, repo_type=repo_type, token=token.value or False), endpoint)
    except GatedRepoError:
        if not token.value:
            raise AuthError(
                "no_token",
                f"{repo_id} is gated and no Hugging Face token was found. Set HF_TOKEN, run `hf auth login`, or "
                f"pass --hf-token-file; then accept the licence at {url}.",
            ) from None
        raise AuthError(
            "gated",
            f"{repo_id} is gated: accept the licence at {url} with the account of the token from {token.source}, "
            "then retry.",
        ) from None
    except RepositoryNotFoundError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401 and not token.value:
            # Anonymous: the hub answers 401 "not found" for a misspelled repo and for a private one alike.
            raise AuthError(
                "not_found_or_private",
                f"{repo_id}: not found for an anonymous request. Check the spelling (organisation/name, e.g. "
                "mistralai/Mistral-7B-v0.1); if the repo is private, set HF_TOKEN or pass --hf-token-file with a "
                "token that can read it.",
            ) from None
        if status == 401:
            return _unauthorized(repo_id, token)
        raise AuthError(
            "not_found",
            f"{repo_id}: not found on {endpoint} (check the spelling; private repos also answer 404 to other accounts).",
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return _unauthorized(repo_id, token)
        if status == 403:
            raise AuthError(
                "gated",
                f"{repo_id}: access denied (403). If the repo is gated, accept the licence at {url} with the account "
                f"of the token from {token.source}; fine-grained tokens also need read access to gated repos.",
            ) from None
        raise AuthError("hub_error", mask(f"{repo_id}: the hub answered {status}: {e}", token)) from None
    except Exception as e:  # connection refused, DNS, timeouts
        name = type(e).__name__
        if "Connect" in name or "Timeout" in name or "Connection" in str(e) or "resolve" in str(e).lower():
            raise AuthError(
                "unreachable",
                f"the hub at {endpoint} is unreachable ({name}). Check the network or proxy, or use HF_HUB_OFFLINE=1 "
                "with a cached model or a local directory.",
            ) from None
        raise
    return f"{repo_id}: accessible with token from {token.source}"


class ModelSourceError(AuthError):
    """A model path that does not exist (a usage error: exit status 2)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__("no_such_directory", message)


_CHECKED: dict[tuple[str, str | None], str] = {}


def check_model(name: str, token: Token, field: str = "--model", revision: str | None = None, *,
                cached_if_unreachable: bool = True) -> str:
    """The preflight of a model, as every stage that loads one by name runs it before any work (training through
    `preflight_for_training`, launch/train.sh through `main`). A local directory passes. A path that does not
    exist (ModelSourceError) and a hub id that is gated, private, misspelt, unreachable, or offline without a
    cached copy (AuthError) stop here, with one line that names `field` and the fix. Without it, the stages
    other than training let transformers retry an unreachable hub for about 50 s and then report a download
    failure, with the CLI's advice about paths and free space; training called a missing directory an
    unreachable hub. Returns the preflight's status line; runs once per model and process.

    `cached_if_unreachable`: with the hub unreachable and a cached copy, go on (transformers loads the copy after
    its own retries, as it did before this check; the warning says how to skip the hub). Training passes False
    and stops, since every worker would wait through those retries on allocated GPUs."""
    from stepdpo.models import ModelError, model_ref

    try:
        ref = model_ref(name)
    except ModelError as e:  # a GGUF path that does not exist
        raise ModelSourceError(_named(name, field) + str(e)[len(f"--model {name}"):]) from None
    if ref.is_local:
        return f"{name}: local {'GGUF file' if ref.is_gguf else 'directory'}"
    if (name, revision) in _CHECKED:
        return _CHECKED[name, revision]
    if looks_like_path(name):
        raise ModelSourceError(f"{_named(name, field)}: no such model directory")
    name = ref.path  # a GGUF file in a hub repository: the repository is what the hub is asked about
    try:
        status = preflight(name, token, revision=revision)
    except AuthError as e:
        message = mask(str(e), token)
        if not (cached_if_unreachable and e.kind == "unreachable" and _cached(name, revision)):
            # named with the field too: mine and eval load more than one model
            message = (_named(name, field) + message[len(name):] if message.startswith(name)
                       else f"{_named(name, field)}: {message}")
            raise AuthError(e.kind, message) from None
        import logging

        status = f"{name}: cached copy, the hub is unreachable"
        logging.getLogger("stepdpo.auth").warning(
            "%s: %s Loading the cached copy; HF_HUB_OFFLINE=1 skips the hub.", _named(name, field), message)
    _CHECKED[name, revision] = status
    return status


def _named(name: str, field: str) -> str:
    """`--model NAME` for a flag, `NAME (where it came from)` otherwise."""
    return f"{field} {name}" if field.startswith("--") else f"{name} ({field})"


def _cached(repo_id: str, revision: str | None, repo_type: str = "model") -> bool:
    """Whether the hub cache holds a copy (its config.json; a dataset's README.md)."""
    from huggingface_hub import try_to_load_from_cache

    probe = "config.json" if repo_type == "model" else "README.md"
    try:
        return isinstance(try_to_load_from_cache(repo_id, probe, revision=revision, repo_type=repo_type), str)
    except Exception:  # an id the cache cannot even name
        return False


def model_token(name: str, token_file: str | None, field: str = "--model", revision: str | None = None) -> str | None:
    """The token for loading `name` (see `resolve_token`), after `check_model`: what a stage calls first."""
    token = resolve_token(token_file)
    check_model(name, token, field, revision)
    return token.value


def _bounded(call, endpoint: str):
    """Run the hub call with a deadline (connect + read), so a black-holed proxy cannot hang a launch. A daemon
    thread: one stuck in a socket read must not keep the process alive after the error."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="stepdpo-preflight")
    thread.start()
    thread.join(PREFLIGHT_TIMEOUT)
    if thread.is_alive():
        raise AuthError("unreachable", f"the hub at {endpoint} did not answer within {PREFLIGHT_TIMEOUT:.0f} s. Check "
                        "the network or proxy (STEPDPO_PREFLIGHT_TIMEOUT raises the limit), or use HF_HUB_OFFLINE=1 "
                        "with a cached model or a local directory.")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def preflight_for_training(config) -> None:
    """The preflight inside the training entry (`stepdpo train`, `accelerate launch -m stepdpo.train.run`): the
    main process checks the hub before any model loads while the others wait, and every process stops (exit
    status 3, one line, no traceback) when it fails. launch/train.sh already ran it before starting the workers
    and says so with STEPDPO_PREFLIGHT_DONE=1."""
    if os.environ.get("STEPDPO_PREFLIGHT_DONE") == "1":
        return
    from accelerate import PartialState

    state = PartialState()
    message = None
    if state.is_main_process:
        try:
            token = resolve_token(config.hf_token_file)
            status = check_model(config.model_name_or_path, token, "--model_name_or_path", config.model_revision,
                                 cached_if_unreachable=False)
            import logging

            logging.getLogger("stepdpo.auth").info("preflight: %s", status)
        except AuthError as e:
            message = (e.kind, mask(str(e)))
    if state.num_processes > 1:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        error = ModelSourceError(message[1]) if message[0] == "no_such_directory" else AuthError(*message)
        if state.is_main_process:
            raise error
        raise SystemExit(error.exit_code)  # the main process prints the reason once


def _unauthorized(repo_id: str, token: Token) -> str:
    if token.value:
        raise AuthError(
            "bad_token",
            f"{repo_id}: the Hugging Face token from {token.source} was rejected (401): it is invalid or expired. "
            "Create a new one at https://huggingface.co/settings/tokens.",
        )
    raise AuthError(
        "no_token",
        f"{repo_id}: authentication required (401) and no token was found. Set HF_TOKEN, run `hf auth login`, "
        "or pass --hf-token-file.",
    )


def _recipe_fields(argv: list[str]) -> dict:
    """model/dataset/token-file settings from `--config R.yaml` and `--field value` overrides."""
    from stepdpo.options import config_argument, read_config_file

    fields: dict = {}
    args = list(argv)
    path = config_argument(args)
    if path is not None:
        fields.update(read_config_file(path))
    for key in ("model_name_or_path", "model_revision", "hf_token_file", "hub_dataset"):
        flag = f"--{key}"
        if flag in args and args.index(flag) + 1 < len(args):
            fields[key] = args[args.index(flag) + 1]
    return fields


def main(argv: list[str] | None = None) -> int:
    """Preflight for launch/train.sh: `python -m stepdpo.auth --config R.yaml [overrides]`."""
    import sys

    try:
        fields = _recipe_fields(sys.argv[1:] if argv is None else argv)
    except OptionsError as e:  # a recipe it cannot read: one line here, before any worker starts
        print(f"stepdpo preflight: {e}", file=sys.stderr)
        return 2
    model = fields.get("model_name_or_path")
    if not model:
        print("stepdpo preflight: no model_name_or_path in the recipe or the overrides", file=sys.stderr)
        return 2
    try:
        token = resolve_token(fields.get("hf_token_file"))
        status = check_model(model, token, "--model_name_or_path", fields.get("model_revision"),
                             cached_if_unreachable=False)
        print(f"[preflight] {status}", file=sys.stderr)
        if fields.get("hub_dataset"):
            print(f"[preflight] {preflight(fields['hub_dataset'], token, repo_type='dataset')}", file=sys.stderr)
    except AuthError as e:
        print(f"stepdpo preflight: {e.kind}: {mask(str(e))}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
