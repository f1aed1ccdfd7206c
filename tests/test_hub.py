"""glmvoice_cli.models.hub: stage files, folder inspection and downloads against a local fake hub."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from glmvoice_cli.errors import CheckpointError, GlmVoiceError, ModelNotFoundError
from glmvoice_cli.models import hub
from tests.fake_hub import FakeHub, serving

LM_REPO = hub.LM.repo_id


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    with serving(monkeypatch, tmp_path) as fake:
        yield fake


def _shards(fake: FakeHub) -> list[str]:
    index = json.loads(fake.repos[LM_REPO][hub.LM.weights_index or ""])
    return sorted(set(index["weight_map"].values()))


def _expected_files(fake: FakeHub, stage: hub.Stage) -> set[str]:
    names = set(stage.files) | set(stage.extra_files)
    if stage.weights_index:
        names |= {stage.weights_index, *_shards(fake)}
    return {n for n in names if n in fake.repos[stage.repo_id]}


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and text.strip() == text
    return text


# --------------------------------------------------------------------------- downloads


@pytest.mark.parametrize("name", list(hub.STAGES))
def test_download_fetches_exactly_the_needed_files(fake_hub: FakeHub, tmp_path: Path, name: str) -> None:
    stage = hub.STAGES[name]
    status = hub.download_stage(stage, tmp_path / name)
    assert status.complete and status.state == "complete"
    expected = _expected_files(fake_hub, stage)
    assert fake_hub.fetched() == {f"{stage.repo_id}/{n}" for n in expected}
    for n in expected:
        assert (tmp_path / name / n).read_bytes() == fake_hub.repos[stage.repo_id][n]
    assert status.size_bytes >= sum(len(fake_hub.repos[stage.repo_id][n]) for n in expected)
    assert not (tmp_path / name / "README.md").exists()


def test_lm_shards_follow_the_index_for_any_count(fake_hub: FakeHub, tmp_path: Path) -> None:
    files = fake_hub.repos[LM_REPO]
    index = json.loads(files[hub.LM.weights_index or ""])
    first = min(index["weight_map"].values())
    index["weight_map"] = {"only.weight": first}  # a one-shard index: the other shards are never fetched
    files[hub.LM.weights_index or ""] = json.dumps(index).encode()
    status = hub.download_stage(hub.LM, tmp_path / "lm")
    assert status.complete
    fetched_shards = {n for n in fake_hub.fetched() if n.endswith(".safetensors")}
    assert fetched_shards == {f"{LM_REPO}/{first}"}


def test_second_download_transfers_nothing(fake_hub: FakeHub, tmp_path: Path) -> None:
    hub.download_stage(hub.DECODER, tmp_path / "decoder")
    before = len(fake_hub.seen)
    status = hub.download_stage(hub.DECODER, tmp_path / "decoder")
    assert status.complete
    metadata = [s.method == "HEAD" or s.path.startswith("/api/") for s in fake_hub.seen[before:]]
    assert metadata and all(metadata)  # the listing and metadata checks only, no file bytes


def test_cut_transfer_resumes_with_a_range_request(fake_hub: FakeHub, tmp_path: Path) -> None:
    shard = _shards(fake_hub)[1]
    name = f"{LM_REPO}/{shard}"
    fake_hub.cut.add(name)
    status = hub.download_stage(hub.LM, tmp_path / "lm")
    assert status.complete
    gets = fake_hub.gets(name)
    assert len(gets) == 2 and gets[0].range is None
    assert gets[1].range is not None and gets[1].range.startswith("bytes=")
    resumed_from = int(gets[1].range[len("bytes=") : -1])
    assert 0 < resumed_from < len(fake_hub.repos[LM_REPO][shard])  # resumed, not restarted
    assert (tmp_path / "lm" / shard).read_bytes() == fake_hub.repos[LM_REPO][shard]


def test_interrupted_download_completes_on_the_next_call(fake_hub: FakeHub, tmp_path: Path) -> None:
    first, second = _shards(fake_hub)[:2]
    name = f"{LM_REPO}/{second}"
    fake_hub.cut.add(name)
    fake_hub.fail_resume.add(name)  # the in-call resume fails too: the whole call fails
    with pytest.raises(GlmVoiceError) as info:
        hub.download_stage(hub.LM, tmp_path / "lm")
    message = _one_line(info.value)
    assert second in message and "glmvoice models download lm" in message
    partial = hub.inspect_stage(hub.LM, tmp_path / "lm")
    assert partial.state == "incomplete" and second in partial.missing

    fake_hub.fail_resume.clear()
    status = hub.download_stage(hub.LM, tmp_path / "lm")
    assert status.complete
    assert (tmp_path / "lm" / second).read_bytes() == fake_hub.repos[LM_REPO][second]
    assert len(fake_hub.gets(f"{LM_REPO}/{first}")) == 1  # finished files are kept, not fetched again


def test_offline_without_files_is_one_line_naming_what_is_missing(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        hub.download_stage(hub.TOKENIZER, tmp_path / "tokenizer")
    message = _one_line(info.value)
    assert "HF_HUB_OFFLINE" in message and "glmvoice models download tokenizer" in message
    assert fake_hub.seen == []


def test_offline_with_complete_files_succeeds(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.download_stage(hub.DECODER, tmp_path / "decoder")
    (tmp_path / "decoder" / "hift.pt").unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"hift.pt"):
        hub.download_stage(hub.DECODER, tmp_path / "decoder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub.download_stage(hub.DECODER, tmp_path / "decoder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(fake_hub.seen)
    assert hub.download_stage(hub.DECODER, tmp_path / "decoder").complete
    assert len(fake_hub.seen) == before


def test_offline_set_in_huggingface_hub_only(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub read HF_HUB_OFFLINE=1 at import: its refusal is the same one-line error."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as info:
        hub.download_stage(hub.DECODER, tmp_path / "decoder")
    assert "HF_HUB_OFFLINE" in _one_line(info.value)
    assert fake_hub.seen == []


def test_token_goes_to_the_hub_but_not_to_the_cdn(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    hub.download_stage(hub.DECODER, tmp_path / "decoder")
    hub_calls = [s for s in fake_hub.seen if s.server == "hub"]
    cdn_calls = [s for s in fake_hub.seen if s.server == "cdn"]
    assert hub_calls and cdn_calls
    assert all(s.authorization == "Bearer hf_fake_token" for s in hub_calls)
    assert all(s.authorization is None for s in cdn_calls)


def test_endpoint_argument_overrides_hf_endpoint(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: must not be used
    status = hub.download_stage(hub.TOKENIZER, tmp_path / "t", endpoint=fake_hub.endpoint)
    assert status.complete


def test_missing_required_file_on_the_hub(fake_hub: FakeHub, tmp_path: Path) -> None:
    del fake_hub.repos[hub.DECODER.repo_id]["hift.pt"]
    with pytest.raises(ModelNotFoundError) as info:
        hub.download_stage(hub.DECODER, tmp_path / "decoder")
    assert "hift.pt" in _one_line(info.value)


def test_missing_optional_file_is_skipped(fake_hub: FakeHub, tmp_path: Path) -> None:
    del fake_hub.repos[LM_REPO]["generation_config.json"]
    assert hub.download_stage(hub.LM, tmp_path / "lm").complete


def test_reporter_sees_every_transferred_byte(fake_hub: FakeHub, tmp_path: Path) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.done: dict[str, int] = {}
            self.totals: dict[str, int | None] = {}
            self.finished: list[str] = []

        def file_started(self, name: str, total: int | None, initial: int) -> None:
            self.totals[name], self.done[name] = total, initial

        def file_advanced(self, name: str, n: int) -> None:
            self.done[name] += n

        def file_total(self, name: str, total: int) -> None:
            self.totals[name] = total

        def file_finished(self, name: str) -> None:
            self.finished.append(name)

    recorder = Recorder()
    hub.download_stage(hub.LM, tmp_path / "lm", reporter=recorder)
    files = fake_hub.repos[LM_REPO]
    shards = _shards(fake_hub)
    small = _expected_files(fake_hub, hub.LM) - set(shards)
    expected = {"lm/files": sum(len(files[n]) for n in small), "lm/weights": sum(len(files[n]) for n in shards)}
    assert recorder.done == recorder.totals == expected  # one batch per snapshot_download, in bytes written


# --------------------------------------------------------------------------- inspection


def _fill(folder: Path, names: list[str], size: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"x" * size)


def _write_index(folder: Path, shards: list[str]) -> None:
    weight_map = {f"w{i}": s for i, s in enumerate(shards)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_lm_needs_every_shard_named_in_its_index(tmp_path: Path) -> None:
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    _fill(tmp_path, list(hub.LM.files) + shards[:3])
    _write_index(tmp_path, shards)
    status = hub.inspect_stage(hub.LM, tmp_path)
    assert status.missing == (shards[3],) and status.state == "incomplete"
    _fill(tmp_path, shards[3:])
    assert hub.inspect_stage(hub.LM, tmp_path).complete


def test_lm_single_weights_file_counts_as_complete(tmp_path: Path) -> None:
    """Folders written locally (selftest, golden) hold one model.safetensors and no index."""
    _fill(tmp_path, [*hub.LM.files, "model.safetensors"])
    status = hub.inspect_stage(hub.LM, tmp_path)
    assert status.complete and "model.safetensors" in status.required


def test_empty_file_counts_as_missing(tmp_path: Path) -> None:
    _fill(tmp_path, list(hub.DECODER.files))
    (tmp_path / "flow.pt").write_bytes(b"")
    assert hub.inspect_stage(hub.DECODER, tmp_path).missing == ("flow.pt",)


def test_unreadable_or_unsafe_index(tmp_path: Path) -> None:
    _fill(tmp_path, list(hub.LM.files))
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    status = hub.inspect_stage(hub.LM, tmp_path)
    assert not status.complete and any("unreadable" in m for m in status.missing)
    _write_index(tmp_path, ["../../etc/passwd"])
    with pytest.raises(CheckpointError, match="weight_map"):
        hub.read_shard_names(tmp_path / "model.safetensors.index.json")


def test_absent_folder_and_unknown_stage(tmp_path: Path) -> None:
    status = hub.inspect_stage(hub.TOKENIZER, tmp_path / "nope")
    assert status.state == "absent" and status.size_bytes == 0 and not status.exists
    with pytest.raises(ModelNotFoundError, match="tokenizer, lm, decoder"):
        hub.get_stage("vocoder")


def test_require_complete_messages(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        hub.require_complete(hub.LM, tmp_path / "lm")
    assert "`glmvoice models download lm`" in _one_line(info.value)
    _fill(tmp_path / "dec", ["config.yaml"])
    with pytest.raises(ModelNotFoundError) as info:
        hub.require_complete(hub.DECODER, tmp_path / "dec", "--decoder")
    message = _one_line(info.value)
    assert "--decoder" in message and "flow.pt" in message and "glmvoice models download decoder" in message


def test_remove_stage_reports_freed_bytes(tmp_path: Path) -> None:
    _fill(tmp_path / "decoder", list(hub.DECODER.files), size=10)
    assert hub.remove_stage(tmp_path / "decoder") == 30
    assert not (tmp_path / "decoder").exists()
    assert hub.remove_stage(tmp_path / "decoder") == 0


# --------------------------------------------------------------------------- checksums


def test_verify_after_download_and_after_corruption(fake_hub: FakeHub, tmp_path: Path) -> None:
    from glmvoice_cli.models import integrity

    folder = tmp_path / "lm"
    hub.download_stage(hub.LM, folder)
    result = integrity.verify_stage(hub.LM, folder)
    assert result.ok and set(result.good) == set(hub.inspect_stage(hub.LM, folder).required)
    shard = _shards(fake_hub)[0]
    data = bytearray((folder / shard).read_bytes())
    data[10] ^= 0xFF
    (folder / shard).write_bytes(bytes(data))
    (folder / "config.json").write_text('{"edited": true}')
    result = integrity.verify_stage(hub.LM, folder)
    assert not result.ok and set(result.bad) == {shard, "config.json"}


def test_verify_folder_without_records(tmp_path: Path) -> None:
    from glmvoice_cli.models import integrity

    _fill(tmp_path, list(hub.DECODER.files))
    result = integrity.verify_stage(hub.DECODER, tmp_path)
    assert result.ok and result.unverified == hub.DECODER.files and result.good == ()


def test_rejected_token_names_hf_token(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.token = "hf_right"
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(GlmVoiceError) as info:
        hub.download_stage(hub.DECODER, tmp_path / "decoder")
    message = _one_line(info.value)
    assert "HF_TOKEN" in message and "glmvoice models download decoder" in message
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    assert hub.download_stage(hub.DECODER, tmp_path / "decoder").complete


def test_mirror_from_hf_endpoint_at_call_time(fake_hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub fixed its ENDPOINT at import; HF_ENDPOINT set later still takes effect."""
    import huggingface_hub.constants as hf_constants

    assert hf_constants.ENDPOINT != fake_hub.endpoint  # noqa: SIM300 - the library's value on the left, as the docstring reads
    assert hub.hub_endpoint() == fake_hub.endpoint
    assert hub.download_stage(hub.TOKENIZER, tmp_path / "tokenizer").complete
    assert {s.server for s in fake_hub.seen} == {"hub", "cdn"}


def test_remove_stage_drops_a_link_but_not_its_target(tmp_path: Path) -> None:
    _fill(tmp_path / "real", list(hub.DECODER.files))
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert hub.remove_stage(tmp_path / "link") == 0
    assert not (tmp_path / "link").exists() and (tmp_path / "real" / "flow.pt").is_file()


@pytest.mark.parametrize(("stage", "filename", "cached"), [
    (hub.DECODER, "flow.pt", False),  # large (LFS) file: sha256 from X-Linked-Etag
    (hub.DECODER, "config.yaml", True),  # small file: git blob sha1 from ETag, in the Hugging Face cache
])
def test_a_mirror_serving_other_bytes_is_caught_and_nothing_bad_is_kept(
    fake_hub: FakeHub, tmp_path: Path, stage: hub.Stage, filename: str, cached: bool
) -> None:
    name = f"{stage.repo_id}/{filename}"
    fake_hub.scramble.add(name)
    folder = None if cached else tmp_path / "decoder"
    with pytest.raises(CheckpointError) as info:
        hub.download_stage(stage, folder, workers=1)
    message = _one_line(info.value)
    assert name in message and "checksum" in message and "glmvoice models download decoder" in message
    from glmvoice_cli.models import cache

    where = folder if folder is not None else cache.snapshots(stage.repo_id)[0]
    assert not (where / filename).exists()
    if cached:  # the bad blob is gone too, or the next download would be handed it again
        blobs = where.parent.parent / "blobs"
        assert all(p.read_bytes() != fake_hub.repos[stage.repo_id][filename][::-1] for p in blobs.iterdir())
    fake_hub.scramble.clear()
    status = hub.download_stage(stage, folder, workers=1)
    assert status.complete and (status.path / filename).read_bytes() == fake_hub.repos[stage.repo_id][filename]


def test_cache_download_is_the_copy_huggingface_hub_itself_finds(fake_hub: FakeHub) -> None:
    """Into the Hugging Face cache, as `hf download` and transformers lay it out: they find it offline."""
    import huggingface_hub as hf

    from glmvoice_cli.models import cache

    status = hub.download_stage(hub.LM)
    assert status.path == cache.repo_dir(LM_REPO) / "snapshots" / fake_hub.commit(LM_REPO)
    before = len(fake_hub.seen)
    for name in status.required:
        found = hf.try_to_load_from_cache(LM_REPO, name, cache_dir=cache.hub_cache_dir())
        assert isinstance(found, str) and Path(found) == status.path / name
    assert "modeling_chatglm.py" not in {p.name for p in status.path.iterdir()}  # only the stage's files
    assert len(fake_hub.seen) == before
