"""Model names -> local directories (hybridserve/hub.py), against hub cache layouts built on disk.

The hub is never contacted: HF_HUB_OFFLINE is on in every test, so what is resolved comes from the
cache layout huggingface_hub reads (refs/<revision> -> snapshots/<commit>/files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridserve.hub import HubOptions, ModelNotFoundError, resolve

ROOT = Path(__file__).resolve().parents[1]
REPO = "acme/tiny-hybrid"
MAIN = "a" * 40
V2 = "b" * 40


def cache_layout(cache: Path) -> Path:
    """Two revisions of REPO: `main` and the tag `v2`, each a snapshot with its own config."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    for ref, commit in (("main", MAIN), ("v2", V2)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        (snap / "config.json").write_text(json.dumps({"revision": ref}))
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def _revision_of(path: str) -> str:
    return json.loads((Path(path) / "config.json").read_text())["revision"]


def test_directories_and_presets_are_used_as_they_are(tmp_path, offline):
    assert resolve(str(tmp_path)) == str(tmp_path)
    assert resolve("tiny") == "tiny"
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve(str(tmp_path / "missing" / "checkpoint"))


def test_download_dir_and_revision_pick_the_snapshot(tmp_path, offline):
    cache = cache_layout(tmp_path / "cache")
    assert _revision_of(resolve(REPO, HubOptions(download_dir=str(cache)))) == "main"
    assert _revision_of(resolve(REPO, HubOptions(revision="v2", download_dir=str(cache)))) == "v2"
    assert _revision_of(resolve(REPO, HubOptions(revision=V2, download_dir=str(cache)), weights=False)) == "v2"


def test_a_model_missing_from_the_cache_says_where_it_looked_and_why(tmp_path, offline):
    cache = cache_layout(tmp_path / "cache")
    with pytest.raises(ModelNotFoundError) as e:
        resolve(REPO, HubOptions(revision="v3", download_dir=str(cache)))
    assert f"not in the Hugging Face cache at {cache} at revision 'v3'; HF_HUB_OFFLINE is set" in str(e.value)
    with pytest.raises(ModelNotFoundError, match="acme/other: not a directory, not a preset"):
        resolve("acme/other", HubOptions(download_dir=str(cache)))


@pytest.mark.parametrize("env", ["HF_HOME", "HF_HUB_CACHE"])
def test_the_cache_is_found_through_the_environment(env, tmp_path):
    """huggingface_hub reads its environment at import, so each case is a fresh interpreter."""
    cache = cache_layout(tmp_path / "hub" if env == "HF_HOME" else tmp_path)
    code = f"from hybridserve.hub import resolve; print(resolve({REPO!r}))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**clean, "PYTHONPATH": str(ROOT), env: str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip() == str(cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / MAIN)
