"""Pushing a merge to the fake Hub. The upload protocol (commits, LFS/Xet) cannot exist offline: the two HfApi
methods that speak it are the one boundary replaced (``RecordingHfApi``); everything before them is real."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hub_world import SECRET, resolver, ta_config

from merging import MergeError, SourceError, parse_config, run_merge
from merging.hub import hub_model_card, push_merge

pytestmark = pytest.mark.usefixtures("no_ambient_token")


class RecordingHfApi:
    """Stand-ins for HfApi.create_repo and HfApi.upload_folder.

    Uploading needs the Hub's commit and LFS/Xet protocols, which cannot exist offline; these two client methods
    are the one boundary replaced. They record what they were asked, and the folder's content at that moment."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi, RepoUrl

        self.calls: list[tuple] = []
        recorder = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, repo_type=None, **kw):
            recorder.calls.append(("create_repo", repo_id, private, exist_ok, repo_type, api.token))
            return RepoUrl(f"{api.endpoint}/{repo_id}", endpoint=api.endpoint)

        def upload_folder(api, *, repo_id, folder_path, **kw):
            files = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                     for p in Path(folder_path).rglob("*") if p.is_file()}
            recorder.calls.append(("upload_folder", repo_id, files, api.token))
            return None

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_creates_the_repo_and_uploads_the_folder_with_its_card(world, tmp_path, monkeypatch):
    hub = world["hub"]
    monkeypatch.setenv("HF_TOKEN", SECRET)
    cfg = parse_config(ta_config("acme/base", "acme/ft0@v2", "acme/gated"))
    run_merge(cfg, tmp_path / "merged", resolver=resolver(world))
    api = RecordingHfApi(monkeypatch)
    url = push_merge(tmp_path / "merged", "me/merged-model", private=True, endpoint=hub.url)
    assert url == f"{hub.url}/me/merged-model"
    (create, repo_id, private, exist_ok, repo_type, tok), (upload, up_repo, files, up_tok) = api.calls
    assert (create, repo_id, private, exist_ok, repo_type) == ("create_repo", "me/merged-model", True, True, "model")
    assert (upload, up_repo) == ("upload_folder", "me/merged-model")
    assert tok == up_tok == SECRET  # the client authenticates with it...
    for name, data in files.items():  # ...but no uploaded file holds it
        assert SECRET.encode() not in data, name
    assert {"model.safetensors", "config.json", "merge_config.yml", "README.md"} <= set(files)
    assert files["model.safetensors"] == (tmp_path / "merged" / "model.safetensors").read_bytes()
    front = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert front["base_model"] == ["acme/base", "acme/ft0", "acme/gated"]  # every input, as Hub repo ids
    assert "merge" in front["tags"]
    assert "acme/ft0@v2" in yaml.safe_dump(yaml.safe_load(files["merge_config.yml"]))  # the exact revision merged


def test_push_refuses_a_folder_holding_the_token_and_needs_one(world, tmp_path, monkeypatch):
    run_merge(parse_config(ta_config(str(world["base"]), str(world["ft0"]), str(world["ft1"]))), tmp_path / "merged")
    api = RecordingHfApi(monkeypatch)
    with pytest.raises(MergeError, match="pushing needs a token"):
        push_merge(tmp_path / "merged", "me/m", endpoint=world["hub"].url)
    (tmp_path / "merged" / "notes.txt").write_text(f"token={SECRET}\n")
    with pytest.raises(MergeError) as err:
        push_merge(tmp_path / "merged", "me/m", token=SECRET, endpoint=world["hub"].url)
    assert str(err.value) == "notes.txt: contains the Hub token; refusing to upload it"
    assert api.calls == []
    with pytest.raises(SourceError, match="not a Hub repo id"):
        push_merge(tmp_path / "merged", "me/../m", token=SECRET, endpoint=world["hub"].url)


def test_model_card_base_model_becomes_hub_repo_ids():
    card = "---\nbase_model:\n- acme/base@v1\n- /tmp/local/ft\n- acme/ft\ntags:\n- merge\n---\n\n# Merged\n"
    fixed = hub_model_card(card)
    front = yaml.safe_load(fixed.split("---")[1])
    assert front == {"base_model": ["acme/base", "acme/ft"], "tags": ["merge"]}
    assert fixed.endswith("---\n\n# Merged\n")
    assert hub_model_card(fixed) == fixed
