"""Hub upload of exports, against a local HTTP server speaking the part of the Hub API that
``create_repo`` + ``upload_folder`` use (HF_ENDPOINT pointed at it): the files that arrive are the export's."""

import base64
import http.server
import json
import threading

import pytest

from ftengine.core.config import validate_config
from ftengine.core.errors import ConfigError
from ftengine.engine import pipeline


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Records repository creations and commits; every file is a regular (inline, base64) upload."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        port = self.server.server_port
        if self.path == "/api/repos/create":
            self.server.created.append(json.loads(body))
            out = {"url": f"http://127.0.0.1:{port}/{json.loads(body)['organization']}/{json.loads(body)['name']}"}
        elif "/preupload/" in self.path:
            out = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in json.loads(body)["files"]]}
        elif "/commit/" in self.path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            self.server.commits.append({(v := e["value"])["path"]: base64.b64decode(v["content"])
                                        for e in lines if e["key"] == "file"})
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            out = {"commitUrl": f"http://127.0.0.1:{port}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40}
        else:
            out = {}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.created, server.commits = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests' default, for this server
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield server
    server.shutdown()


def test_a_run_pushes_its_export_with_a_model_card(tiny_config, hub):
    config = tiny_config(max_steps=2)
    config = validate_config({**config.model_dump(mode="json"),
                              "export": [{"format": "lora", "push_to_hub": "someone/tiny-lora", "private": True}]})
    result = pipeline.run(config)
    (created,) = hub.created
    assert (created["organization"], created["name"], created["visibility"]) == ("someone", "tiny-lora", "private")
    (sent,) = hub.commits
    local = result.exports["lora"][0]
    assert {p.name: p.read_bytes() for p in local.iterdir()} == sent
    card = sent["README.md"].decode()
    assert f"base_model: {config.model.name_or_path}" in card and "library_name: peft" in card
    assert f"| final loss | {round(result.train.last_loss, 4)} |" in card and "| data |" in card
    assert any(line.startswith("pushed to http://127.0.0.1") for line in result.exports["lora"][1])


def test_a_push_without_a_token_fails_before_training(tiny_config, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    config = tiny_config()
    config = validate_config({**config.model_dump(mode="json"), "export": [{"format": "lora",
                                                                            "push_to_hub": "someone/x"}]})
    with pytest.raises(ConfigError, match=r"export\[0\]\.push_to_hub: pushing to someone/x needs a Hugging Face"):
        pipeline.run(config)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("entry, words", [
    ({"push_to_hub": "no-owner"}, "expected a Hub repository id 'owner/name', got 'no-owner'"),
    ({"push_to_hub": "a/b", "private": "yes"}, "export[0].private: expected true or false"),
    ({"push_to_hub": "a/b", "pirvate": True}, "did you mean export[0].private?"),
])
def test_push_options_are_checked_with_the_config(entry, words):
    with pytest.raises(ConfigError) as error:
        validate_config({"model": {"name_or_path": "-"}, "export": [{"format": "merged", **entry}]})
    assert words in str(error.value)
