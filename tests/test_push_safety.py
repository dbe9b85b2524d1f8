"""``push`` shares only what belongs in a model repo, names nothing of this machine, and asks first.

One short real run (QLoRA on the CPU, a few steps) is trained once, from a LOCAL copy of the demo model
and a LOCAL copy of the demo data, both under a folder with a distinctive name; every test reads it.
No test reaches the Hub: the plan is inspected as data, the upload goes to a recording stand-in for
``HfApi``, and the command line is pointed at a local HTTP server that records any request it gets.
"""

from __future__ import annotations

import getpass
import http.server
import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_PRESET, ROOT, run_cli, snapshot, trained_in_process

pytestmark = pytest.mark.slow

SECRET = "zq81x-private-place"
"""A path component that must never reach anything uploaded."""


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, demo_cache) -> Path:
    """A finished run of a local base model folder on a local data file, with an FSDP-style
    ``training_args.bin`` and other strays in its adapter folder."""
    from engine.demo import DEMO_DATA_FILE, ensure_demo_model

    root = tmp_path_factory.mktemp(SECRET)
    model = root / "models" / "my-base-model"
    shutil.copytree(ensure_demo_model(), model)
    data = root / "data" / "my-examples.jsonl"
    data.parent.mkdir()
    shutil.copyfile(DEMO_DATA_FILE, data)
    preset = yaml.safe_load(DEMO_PRESET.read_text())
    preset["model"]["source"] = str(model)
    preset["data"]["train"] = str(data)
    preset["training"].update(max_steps=3, eval_steps=3, save_steps=3, report_to="none")
    preset["output"] = {"runs_dir": str(root / "runs")}
    preset_file = root / "p.yaml"
    preset_file.write_text(yaml.safe_dump(preset))
    run_dir = root / "runs" / "run"
    trained_in_process(preset_file, run_dir)  # what is pushed comes from the run's files, not its process
    (run_dir / "adapter" / "training_args.bin").write_bytes(b"\x80\x04pickle " + str(root).encode())
    (run_dir / "adapter" / "notes.txt").write_text(f"trained in {root}\n")
    (run_dir / "adapter" / "optimizer-state").mkdir()
    return run_dir


def _private_strings(run_dir: Path) -> list[bytes]:
    """What must not be in an uploaded file: the tmp folder, the run folder, the home folder, the user
    and host name (when they are not trivially short or common words)."""
    root = run_dir.parent.parent
    out = {str(root), str(root.resolve()), str(run_dir), str(run_dir.resolve()), SECRET}
    home = os.path.expanduser("~").rstrip("/")
    if len(home) > 1:
        out.add(home + "/")
    user = getpass.getuser()
    out.add(f"/home/{user}/")
    if len(user) >= 5 and user not in ("admin", "ubuntu", "runner", "jovyan"):
        out.add(user)
    host = socket.gethostname()
    if len(host) >= 5 and host != "localhost":
        out.add(host)
    return sorted(s.encode() for s in out)


def _staged(plan, into: Path) -> dict[str, bytes]:
    plan.stage(into)
    return {p.name: p.read_bytes() for p in sorted(into.iterdir())}  # read_bytes follows the links


# ---------------------------------------------------------------------------------------------
# The plan, as data


def test_nothing_staged_names_this_machine(local_run, tmp_path):
    from engine.after.card import plan_push

    before = snapshot(local_run / "adapter")
    plan = plan_push(local_run, "me/tiny")
    staged = _staged(plan, tmp_path / "stage")
    assert set(staged) == {f.name for f in plan.files}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md",
            "curves.svg"} <= set(staged)
    for name, content in staged.items():
        for secret in _private_strings(local_run):
            assert secret not in content, f"{name} carries {secret!r}"
    # the adapter config names the base by its folder's name; the run's own file is untouched
    assert json.loads(staged["adapter_config.json"])["base_model_name_or_path"] == "my-base-model"
    assert snapshot(local_run / "adapter") == before
    own = json.loads((local_run / "adapter" / "adapter_config.json").read_text())
    assert own["base_model_name_or_path"] == str(local_run.parent.parent / "models" / "my-base-model")
    assert (tmp_path / "stage" / "adapter_model.safetensors").is_symlink()


def test_the_card_is_the_shareable_one_and_the_same_as_the_local_card(local_run, tmp_path):
    from engine.after.card import plan_push

    plan = plan_push(local_run, "me/tiny")
    card = (local_run / "README.md").read_text()
    assert card == plan.card == _staged(plan, tmp_path / "stage")["README.md"].decode()
    preset = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert preset["model"]["source"] == "my-base-model"
    assert preset["data"]["train"] == "my-examples.jsonl"
    assert preset["output"]["runs_dir"] == "runs"
    assert "`my-base-model` (a local copy)" in card and "| source | `my-examples.jsonl` |" in card
    assert 'PeftModel.from_pretrained(base, "me/tiny")' in card
    r = run_cli("card", str(local_run))  # the card command writes the same shareable card
    assert r.returncode == 0, r.stderr
    local = (local_run / "README.md").read_text()
    assert SECRET not in local and str(local_run) not in local and "my-base-model" in local


def test_only_model_repo_files_are_uploaded(local_run):
    from engine.after.card import plan_push

    plan = plan_push(local_run, "me/tiny")
    names = [f.name for f in plan.files]
    assert "training_args.bin" not in names and "notes.txt" not in names
    assert {"training_args.bin", "notes.txt", "optimizer-state/"} <= set(plan.left_out)
    assert all(f.size > 0 for f in plan.files)
    assert plan.total_size == sum(f.size for f in plan.files)


def test_repos_are_private_unless_public(local_run):
    from engine.after.card import plan_push

    assert plan_push(local_run, "me/tiny").private is True
    assert plan_push(local_run, "me/tiny", public=True).private is False


def test_a_local_base_is_named_by_its_hub_id_and_paths_by_their_names(tmp_path):
    from engine.after.card import shareable_model_name, shareable_preset
    from engine.preset import preset_from_dict

    folder = tmp_path / SECRET / "llama-copy"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B"}))
    assert shareable_model_name(str(folder)) == "meta-llama/Llama-3.2-1B"
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "elsewhere")}))
    assert shareable_model_name(str(folder)) == "llama-copy"
    assert shareable_model_name("builtin:tiny-llama") == "builtin:tiny-llama"
    assert shareable_model_name("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"

    preset = preset_from_dict({
        "model": {"source": str(folder)},
        "lora": {"init_from": str(tmp_path / SECRET / "runs" / "old" / "adapter")},
        "data": {"train": str(tmp_path / SECRET / "train.jsonl"), "validation": "~/val.csv"},
        "output": {"runs_dir": str(tmp_path / SECRET / "runs")},
    })
    shared = shareable_preset(preset)
    assert (shared.model.source, shared.lora.init_from, shared.data.train, shared.data.validation,
            shared.output.runs_dir) == ("llama-copy", "adapter", "train.jsonl", "val.csv", "runs")
    assert SECRET not in shared.to_yaml() and str(Path.home()) + "/" not in shared.to_yaml()
    assert preset.model.source == str(folder)  # the original is not changed
    hub = preset_from_dict({"model": {"source": "builtin:tiny-llama"}, "data": {"train": "tatsu-lab/alpaca"}})
    assert shareable_preset(hub).model_dump() == hub.model_dump()


# ---------------------------------------------------------------------------------------------
# The upload, against a recording stand-in for the Hub


class _FakeApi:
    """Records what ``push_run`` asks of ``HfApi``; copies what would be uploaded."""

    calls: list = []
    uploaded: dict[str, bytes] = {}
    exists_public = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://hub.example/{repo_id}"

    def repo_info(self, repo_id, repo_type=None):
        return type("Info", (), {"private": not self.exists_public and self.calls[-1][2]})()

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kw):
        self.calls.append(("upload_folder", repo_id, sorted(allow_patterns)))
        for p in Path(folder_path).iterdir():
            self.uploaded[p.name] = p.read_bytes()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    _FakeApi.calls, _FakeApi.uploaded, _FakeApi.exists_public = [], {}, False
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    return _FakeApi


def test_push_uploads_exactly_the_plan_privately(local_run, fake_hub):
    from engine.after.card import plan_push, push_run

    plan = plan_push(local_run, "me/tiny")
    url = push_run(plan)
    assert url == "https://hub.example/me/tiny"
    assert fake_hub.calls[0] == ("create_repo", "me/tiny", True)
    assert set(fake_hub.uploaded) == {f.name for f in plan.files} and "training_args.bin" not in fake_hub.uploaded
    for name, content in fake_hub.uploaded.items():
        for secret in _private_strings(local_run):
            assert secret not in content, f"{name} carries {secret!r}"
    assert not list(local_run.glob(".push-*"))


def test_a_private_push_into_an_existing_public_repo_is_refused(local_run, fake_hub):
    from engine.after.card import plan_push, push_run
    from engine.errors import UserError

    fake_hub.exists_public = True
    with pytest.raises(UserError, match="already exists .* and is public"):
        push_run(plan_push(local_run, "me/tiny"))
    assert fake_hub.uploaded == {}


# ---------------------------------------------------------------------------------------------
# The command line: consent, and the printout


@pytest.fixture
def recording_hub():
    """A local HTTP server standing in for the Hub's endpoint: it records every request and refuses it."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _any(self):
            requests.append(f"{self.command} {self.path}")
            body = b'{"error": "refused by the test"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = _any

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.requests = requests
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def _env(hub, tmp_path) -> dict:
    return {"HF_TOKEN": "hf_not_a_real_token", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": hub.endpoint}


def test_push_without_a_terminal_or_yes_refuses_and_sends_nothing(local_run, recording_hub, tmp_path):
    for piped in (None, "y\n"):  # a piped answer is not consent: scripts pass --yes
        r = run_cli("push", str(local_run), "me/tiny", env=_env(recording_hub, tmp_path), input=piped)
        assert r.returncode == 2, r.stdout + r.stderr
        errors = r.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: push needs your consent: ")
        assert errors[0].endswith("(pass --yes to upload without asking)")
        assert "Traceback" not in r.stderr
    assert recording_hub.requests == []
    assert not list(local_run.glob(".push-*"))


def test_push_prints_the_plan_private_files_sizes_and_card(local_run, recording_hub, tmp_path):
    r = run_cli("push", str(local_run), "me/tiny", env=_env(recording_hub, tmp_path))
    out = r.stdout
    assert "me/tiny" in out and "private" in out and "PUBLIC" not in out
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "curves.svg"):
        assert any(line.strip().startswith(name) and ("B" in line) for line in out.splitlines()), name
    assert "KiB" in out
    assert "left out" in out and "training_args.bin" in out
    assert "library_name: peft" in out and str(local_run / "README.md") in out  # the card and where it is
    r = run_cli("push", str(local_run), "me/tiny", "--public", env=_env(recording_hub, tmp_path))
    assert "PUBLIC" in r.stdout
    assert recording_hub.requests == []


def _push_on_a_terminal(args: list[str], answer: str, env: dict) -> subprocess.CompletedProcess:
    """``qlora-wizard push ARGS`` with a pseudo-terminal as stdin, answering ``answer``."""
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "push", *args], cwd=ROOT, env=full_env,
                                stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(slave)
        os.write(master, answer.encode())
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_no_on_the_terminal_uploads_nothing_and_a_yes_does(local_run, recording_hub, tmp_path):
    env = _env(recording_hub, tmp_path)
    r = _push_on_a_terminal([str(local_run), "me/tiny"], "n\n", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "upload to me/tiny (private)? [y/N]" in r.stdout and r.stdout.rstrip().endswith("nothing uploaded")
    assert recording_hub.requests == []
    r = _push_on_a_terminal([str(local_run), "me/tiny"], "y\n", env)
    assert r.returncode == 2 and "error: cannot push to me/tiny" in r.stderr, r.stdout + r.stderr
    assert recording_hub.requests  # the yes went on to the (stand-in) Hub
    assert not list(local_run.glob(".push-*"))


def test_a_merged_folder_goes_up_rewritten_without_pickles_and_a_leftover_path_is_refused(local_run, tmp_path):
    from engine.after.card import plan_push
    from engine.errors import UserError

    merged = tmp_path / SECRET / "merged"
    shutil.copytree(local_run.parent.parent / "models" / "my-base-model", merged)
    config = json.loads((merged / "config.json").read_text())
    config["_name_or_path"] = str(local_run.parent.parent / "models" / "my-base-model")
    (merged / "config.json").write_text(json.dumps(config))
    (merged / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    plan = plan_push(local_run, "me/tiny-merged", merged=merged)
    staged = _staged(plan, tmp_path / "stage")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(staged)
    assert "pytorch_model.bin" in plan.left_out and "pytorch_model.bin" not in staged
    assert json.loads(staged["config.json"])["_name_or_path"] == "my-base-model"
    for name, content in staged.items():
        for secret in _private_strings(local_run) + [str(merged).encode()]:
            assert secret not in content, f"{name} carries {secret!r}"
    assert "library_name: transformers" in plan.card
    (merged / "chat_template.jinja").write_text(f"{{# made in {merged} #}}{{{{ messages }}}}")
    with pytest.raises(UserError, match="nothing uploaded: chat_template.jinja would carry the local path"):
        plan_push(local_run, "me/tiny-merged", merged=merged)
