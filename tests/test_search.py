"""scta-search: the Gallery API, the index on disk (incremental, sharded, kill-safe, model-checked, bad files), the
answers (word report, negative terms, cut-off, exclusions, image search, duplicates) and the command line."""

import json
import os
import shutil
import sqlite3
import stat

import numpy as np
import PIL.Image
import pytest
import torch

import scta_search.gallery as gallery_module
from helpers import CAPTIONS, save_search_model, write_photos
from scta_search import Gallery
from scta_search.cli import main
from scta_search.files import read_image_file
from scta_search.gallery import key_token_names
from scta_search.store import MARKER, SHARDS
from scta_train.reference import reference_pair_score


@pytest.fixture()
def setup(tmp_path):
    model, processor = save_search_model(tmp_path / "model")
    write_photos(tmp_path / "photos")
    return tmp_path, model, processor


def build(tmp_path, model, processor, images=None, index="index", **kwargs):
    return Gallery.build(
        model,
        processor,
        images or tmp_path / "photos",
        tmp_path / index,
        model_name_or_path=str(tmp_path / "model"),
        **kwargs,
    )


def count_encoded(monkeypatch) -> list:
    encoded = []
    original = gallery_module.encode_batch

    def spy(model, processor, images):
        encoded.append(len(images))
        return original(model, processor, images)

    monkeypatch.setattr(gallery_module, "encode_batch", spy)
    return encoded


def cli(capsys, *args) -> tuple[int, str, str]:
    """`scta-search ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        status = 0
    except SystemExit as exit_:
        status = exit_.code or 0
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------------
# Ranking


def test_text_search_is_the_heads_ranking_and_two_stage_agrees_when_k_covers_the_gallery(setup):
    tmp_path, model, processor = setup
    gallery = build(tmp_path, model, processor)
    assert len(gallery) == 10 and all(path.endswith(".png") for path in gallery.paths)
    query = "a blue square on a plain background"
    exhaustive = gallery.search_text(query, k=10, rerank_top_k=0)
    assert [r.score for r in exhaustive] == sorted((r.score for r in exhaustive), reverse=True)
    images = [read_image_file(r.path).image for r in exhaustive]
    inputs = processor(images=images, text=[query], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image[:, 0]
    torch.testing.assert_close(torch.tensor([r.score for r in exhaustive]), expected, atol=5e-3, rtol=0)
    covering = gallery.search_text(query, k=10, rerank_top_k=10)
    assert [r.path for r in covering] == [r.path for r in exhaustive]
    assert len(gallery.search_text("a blue square", k=3, rerank_top_k=4)) == 3
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="non-empty string"):
            gallery.search_text(bad)
    for bad in ({"k": 0}, {"k": -1}, {"rerank_top_k": -1}, {"cutoff": 0}, {"cutoff": 1.5}):
        with pytest.raises(ValueError):
            gallery.search_text(query, **bad)


def test_text_search_ranks_by_the_fused_score_and_its_first_stage_is_the_adapter(setup):
    """With an adapter and a fusion weight, a result's score is `head + weight x adapter cosine` (the model's own
    fused `score_candidates`) and the candidates are the adapter's top k, not the raw cosine's."""
    tmp_path, model, processor = setup
    with torch.no_grad():
        model.first_stage.image_map.weight.copy_(torch.randn(24, 24))  # an adapter far from the identity
    model.config.fusion_weight = 2.0
    gallery = build(tmp_path, model, processor)
    query = "a red square at the top"
    results = gallery.search_text(query, k=10, rerank_top_k=0)
    images = [read_image_file(r.path).image for r in results]
    inputs = processor(images=images, text=[query], return_tensors="pt")
    with torch.no_grad():
        image_tokens = model.get_image_features(inputs["pixel_values"]).last_hidden_state
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        captions = model.caption_key_tokens(text.last_hidden_state, inputs["attention_mask"])
        expected = model.score(image_tokens, captions, fusion_weight=2.0)[:, 0]
        head_only = model.score(image_tokens, captions)[:, 0]
    torch.testing.assert_close(torch.tensor([r.score for r in results]), expected, atol=5e-3, rtol=0)
    assert not torch.allclose(expected, head_only, atol=0.1)
    with torch.no_grad():
        image_global = model.get_image_features(inputs["pixel_values"]).pooler_output
        adapter_top = model.first_stage_similarity(image_global, text.pooler_output)[:, 0].topk(3).indices.tolist()
    candidates = gallery.first_stage(gallery.encode_query(query)[1], 3)
    assert sorted(gallery.paths[row] for row in candidates) == sorted(results[i].path for i in adapter_top)


def test_ranking_captions_for_one_image(setup):
    tmp_path, model, processor = setup
    gallery = build(tmp_path, model, processor)
    photo = tmp_path / "photos" / "photo03.png"
    ranked = gallery.search_image(photo, CAPTIONS[:4], k=3)
    inputs = processor(images=[read_image_file(str(photo)).image], text=CAPTIONS[:4], return_tensors="pt")
    with torch.no_grad():
        scores = model(**inputs).logits_per_image[0]
    assert [caption for caption, _ in ranked] == [CAPTIONS[i] for i in scores.argsort(descending=True)[:3]]


def test_the_word_report_is_each_key_tokens_best_alignment_from_the_specification(setup):
    tmp_path, model, processor = setup
    gallery = build(tmp_path, model, processor)
    query = "a purple square on a plain background"
    results = gallery.search_text(query, k=10, rerank_top_k=10, word_report=True)
    inputs = processor(text=[query], return_tensors="pt")
    with torch.no_grad():
        text_tokens = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state[0]
        alignments = {}
        for result in results:
            image = processor(images=[read_image_file(result.path).image], return_tensors="pt")["pixel_values"]
            image_tokens = model.get_image_features(image).last_hidden_state[0]
            alignments[result.path] = reference_pair_score(model.head, image_tokens, text_tokens, text_alignment=True)[
                1:
            ]
    best = torch.stack(list(alignments.values())).max(0).values  # (slots,) over the re-ranked candidates
    names = key_token_names(model, processor, {**inputs, "text_tokens": text_tokens[None]})[1:]
    groups = {}  # word slots of the same words are reported once, by their strongest alignment
    for slot, name in enumerate(names):
        groups.setdefault(frozenset(name.split()), []).append(slot)
    for result in results:
        reference = alignments[result.path]
        chosen = [max(slots, key=lambda slot: float(reference[slot])) for slots in groups.values()]
        assert [w.words for w in result.words] == [names[slot] for slot in chosen]
        reported = torch.tensor([w.alignment for w in result.words])
        torch.testing.assert_close(reported, reference[chosen], atol=5e-3, rtol=0)  # float16 stored tokens
        threshold = gallery_module.MATCHED_SHARE * best[chosen]
        clear = (reference[chosen] - threshold).abs() > 5e-3  # not within float16 noise of the threshold
        expected = (reference[chosen] > 0) & (reference[chosen] >= threshold)
        assert [w.matched for w, c in zip(result.words, clear) if c] == expected[clear].tolist()
        assert result.word_summary().startswith("matched: ")
    assert len(groups) == len(results[0].words) <= int(model.head.word_slot_counts(inputs["attention_mask"].sum(1))[0])


def test_negative_terms_cutoff_and_exclusions(setup):
    tmp_path, model, processor = setup
    gallery = build(tmp_path, model, processor)
    query, negative = "a red square", "a green square"
    plain = {r.path: r.score for r in gallery.search_text(query, k=10, rerank_top_k=0)}
    against = {r.path: r.score for r in gallery.search_text(negative, k=10, rerank_top_k=0)}
    ranked = gallery.search_text(query, k=10, rerank_top_k=0, negative=negative)
    for result in ranked:
        assert result.score == pytest.approx(plain[result.path] - against[result.path], abs=1e-4)
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    cut = gallery.search_text(query, k=10, rerank_top_k=0, cutoff=0.97)
    assert 1 <= len(cut) < 10 and all(r.score >= 0.97 * cut[0].score for r in cut)
    assert len(cut) == sum(score >= 0.97 * max(plain.values()) for score in plain.values())
    kept = gallery.search_text(query, k=10, exclude=["*photo0[0-4].png"])
    assert len(kept) == 5 and all(os.path.basename(r.path) >= "photo05.png" for r in kept)


def test_search_by_image_and_near_duplicate_groups(setup):
    tmp_path, model, processor = setup
    shutil.copy(tmp_path / "photos" / "photo03.png", tmp_path / "photos" / "copy-of-3.png")
    PIL.Image.open(tmp_path / "photos" / "photo05.png").resize((44, 35)).save(tmp_path / "photos" / "resized-5.png")
    gallery = build(tmp_path, model, processor)
    like = gallery.search_like(tmp_path / "photos" / "photo03.png", k=3)
    assert {os.path.basename(r.path) for r in like[:2]} == {"photo03.png", "copy-of-3.png"}
    assert like[0].score == pytest.approx(1.0, abs=1e-3)
    unit = gallery.unit_embeddings()
    cosines = unit @ unit.t()
    threshold = 0.999
    groups = gallery.duplicates(threshold)
    expected = [
        sorted(gallery.paths[j] for j in range(len(gallery)) if cosines[i, j] >= threshold) for i in range(len(gallery))
    ]
    expected = {tuple(g) for g in expected if len(g) > 1}
    assert {tuple(path for path, _ in group) for group in groups} == expected
    assert any({"photo03.png", "copy-of-3.png"} <= {os.path.basename(p) for p, _ in group} for group in groups)
    with pytest.raises(ValueError, match="cosine"):
        gallery.duplicates(1.5)


# ---------------------------------------------------------------------------------------------------------------
# The index on disk


def test_reindexing_encodes_only_new_or_changed_files_reuses_moved_ones_and_drops_deleted_ones(setup, monkeypatch):
    tmp_path, model, processor = setup
    build(tmp_path, model, processor).close()
    encoded = count_encoded(monkeypatch)
    gallery = Gallery.load(tmp_path / "index", writable=True)
    assert gallery.update(tmp_path / "photos")["unchanged"] == 10 and encoded == []
    write_photos(tmp_path / "more", 1, start=20)
    os.replace(tmp_path / "more" / "photo20.png", tmp_path / "photos" / "new.png")
    PIL.Image.new("RGB", (50, 50), "black").save(tmp_path / "photos" / "photo01.png")  # changed
    os.utime(tmp_path / "photos" / "photo01.png", (1e9, 1e9))
    os.remove(tmp_path / "photos" / "photo02.png")  # deleted
    (tmp_path / "photos" / "sub").mkdir()
    os.replace(tmp_path / "photos" / "photo03.png", tmp_path / "photos" / "sub" / "moved.png")  # moved
    before = gallery.tokens([gallery.paths.index(str(tmp_path / "photos" / "photo03.png"))])
    counts = gallery.update(tmp_path / "photos")
    assert counts == {"unchanged": 7, "new": 1, "changed": 1, "renamed": 1, "removed": 2, "skipped": 0}
    assert encoded == [2]  # new.png and photo01.png; the moved file's embeddings are reused
    reloaded = Gallery.load(tmp_path / "index")
    names = sorted(os.path.relpath(p, tmp_path / "photos") for p in reloaded.paths)
    assert len(names) == 10 and "photo02.png" not in names and "photo03.png" not in names and "sub/moved.png" in names
    assert torch.equal(reloaded.tokens([reloaded.paths.index(str(tmp_path / "photos" / "sub" / "moved.png"))]), before)
    fresh = Gallery.build(model, processor, tmp_path / "photos", tmp_path / "fresh")
    row = reloaded.paths.index(str(tmp_path / "photos" / "photo01.png"))
    assert torch.equal(
        reloaded.tokens([row]), fresh.tokens([fresh.paths.index(str(tmp_path / "photos" / "photo01.png"))])
    )


def test_an_update_appends_a_shard_and_never_rewrites_the_stored_ones(setup):
    tmp_path, model, processor = setup
    gallery = build(tmp_path, model, processor, batch_size=4)
    shards = sorted((tmp_path / "index" / SHARDS).iterdir())
    assert len(shards) == 3  # batches of 4, 4 and 2
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    write_photos(tmp_path / "photos", 1, start=30)
    assert gallery.update(tmp_path / "photos", batch_size=4)["new"] == 1
    after = sorted((tmp_path / "index" / SHARDS).iterdir())
    assert len(after) == 4 and all(stamps[p.name] == p.stat().st_mtime_ns for p in after if p.name in stamps)


def test_deletions_are_compacted_when_they_pile_up(setup):
    tmp_path, model, processor = setup
    gallery = build(tmp_path, model, processor, batch_size=4)
    kept_tokens = gallery.tokens(list(range(len(gallery))))[6:]
    for index in range(6):
        os.remove(tmp_path / "photos" / f"photo{index:02d}.png")
    assert gallery.update(tmp_path / "photos")["removed"] == 6
    shards = list((tmp_path / "index" / SHARDS).iterdir())
    assert len(shards) == 1  # 6 of 10 stored rows were dead: rewritten into one shard of the 4 live ones
    assert torch.equal(Gallery.load(tmp_path / "index").tokens([0, 1, 2, 3]), kept_tokens)


def test_a_kill_during_indexing_loses_at_most_the_batch_in_flight(setup, monkeypatch):
    tmp_path, model, processor = setup
    original = gallery_module.encode_batch
    calls = []

    def killed_on_the_third_batch(model_, processor_, images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(model_, processor_, images)

    monkeypatch.setattr(gallery_module, "encode_batch", killed_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, model, processor, batch_size=3)
    monkeypatch.setattr(gallery_module, "encode_batch", original)
    survived = Gallery.load(tmp_path / "index", writable=True)
    assert len(survived) == 6  # two committed batches of 3
    encoded = count_encoded(monkeypatch)
    counts = survived.update(tmp_path / "photos", batch_size=3)
    assert counts["unchanged"] == 6 and counts["new"] == 4 and sum(encoded) == 4


def test_faiss_is_saved_rebuilt_when_rows_change_and_follows_the_factory(setup, monkeypatch):
    faiss = pytest.importorskip("faiss", reason="the FAISS first stage needs faiss-cpu (pip install -e '.[search]')")
    tmp_path, model, processor = setup
    write_photos(tmp_path / "photos", 6)
    for index in range(6, 10):
        os.remove(tmp_path / "photos" / f"photo{index:02d}.png")
    gallery = build(tmp_path, model, processor)
    gallery.search_text("a red square", k=6)
    assert (tmp_path / "index" / "first_stage.faiss").is_file()
    # a fresh load reads the saved index instead of building one
    monkeypatch.setattr(gallery_module, "build_faiss", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
    loaded = Gallery.load(tmp_path / "index", writable=True)
    assert len(loaded.search_text("a red square", k=6)) == 6
    monkeypatch.undo()
    for index in range(3):  # remove 3 of 6: the saved index is stale and must be rebuilt, not searched
        os.remove(tmp_path / "photos" / f"photo{index:02d}.png")
    loaded.update(tmp_path / "photos")
    results = loaded.search_text("a red square", k=6)
    assert len(results) == 3 and all(os.path.exists(r.path) for r in results)
    # the exact first stage and FAISS agree; a factory set after a search is used
    query = torch.nn.functional.normalize(torch.randn(24), dim=-1)
    exact = (loaded.unit_embeddings() @ query).topk(3).indices.tolist()
    assert loaded.first_stage(query, 3) == exact
    loaded.faiss_factory = "HNSW32"
    loaded.first_stage(query, 3)
    assert isinstance(loaded._faiss, faiss.IndexHNSWFlat)
    loaded.faiss_factory = "IVF2,Flat"  # trained on the gallery; nprobe 2 of 2 lists: exact here
    assert sorted(loaded.first_stage(query, 3)) == sorted(exact)
    assert isinstance(faiss.downcast_index(loaded._faiss), faiss.IndexIVFFlat)
    with pytest.raises(ValueError, match="needs at least 1024 images"):
        loaded.faiss_factory = "IVF1024,Flat"
        loaded.first_stage(query, 3)
    with pytest.raises(ValueError, match="not a FAISS index-factory string"):
        loaded.faiss_factory = "no such index"


def test_an_index_of_another_model_is_refused_and_the_fingerprint_is_not_recomputed_per_query(setup, monkeypatch):
    tmp_path, model, processor = setup
    build(tmp_path, model, processor).close()
    other, other_processor = save_search_model(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="was built by another model"):
        Gallery.load(tmp_path / "index", other, other_processor)
    monkeypatch.setattr(gallery_module, "model_fingerprint", lambda m: (_ for _ in ()).throw(AssertionError("hashed")))
    assert len(Gallery.load(tmp_path / "index")) == 10  # weights files unchanged: no hashing
    monkeypatch.undo()
    os.utime(tmp_path / "model" / "model.safetensors", (2e9, 2e9))  # touched: hashed again, still the same model
    assert len(Gallery.load(tmp_path / "index", writable=True)) == 10
    shutil.copytree(tmp_path / "other", tmp_path / "model", dirs_exist_ok=True)  # other weights under the same name
    with pytest.raises(ValueError, match="was built by another model"):
        Gallery.load(tmp_path / "index")
    shutil.move(tmp_path / "model", tmp_path / "moved")
    with pytest.raises(ValueError, match="no longer exists.*--model NEW_PATH"):
        Gallery.load(tmp_path / "index")


def test_a_folder_that_is_not_an_index_is_never_written_into(setup):
    tmp_path, model, processor = setup
    keep = tmp_path / "project"
    keep.mkdir()
    (keep / "manifest.json").write_text('{"name": "my app"}')
    (keep / "main.py").write_text("print('hello')\n")
    with pytest.raises(ValueError, match="not an scta-search index: refusing"):
        build(tmp_path, model, processor, index="project")
    assert sorted(p.name for p in keep.iterdir()) == ["main.py", "manifest.json"]
    with pytest.raises(ValueError, match=r"not an scta-search index \(no scta-index.json\)"):
        Gallery.load(keep)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        build(tmp_path, model, processor, index="afile")
    with pytest.raises(ValueError, match="is a file"):
        build(tmp_path, model, processor, index="afile/index")


def test_other_folders_entries_and_a_users_files_in_the_index_folder_are_kept(setup):
    tmp_path, model, processor = setup
    gallery = build(tmp_path, model, processor)
    write_photos(tmp_path / "holiday", 3, start=40)
    (tmp_path / "index" / "notes.txt").write_text("mine")
    (tmp_path / "index" / "grid.png").write_bytes(b"png")
    counts = gallery.update(tmp_path / "holiday")
    assert counts["new"] == 3 and counts["removed"] == 0 and len(gallery) == 13
    assert (tmp_path / "index" / "notes.txt").read_text() == "mine" and (tmp_path / "index" / "grid.png").exists()
    assert gallery.store.folders() == sorted([str(tmp_path / "photos"), str(tmp_path / "holiday")])


def test_a_read_only_index_is_searched_but_not_replaced(setup):
    tmp_path, model, processor = setup
    build(tmp_path, model, processor).close()
    folder = tmp_path / "index"
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    for path in modes:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        assert len(Gallery.load(folder).search_text("a red square", k=2)) == 2
        assert set(folder.rglob("*")) == set(modes) - {folder}  # nothing written into it (not even a FAISS index)
        with pytest.raises(ValueError, match="not writable"):
            Gallery.load(folder, writable=True)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_old_damaged_and_foreign_indexes_are_refused_with_the_command_that_rebuilds_them(setup):
    tmp_path, model, processor = setup
    old = tmp_path / "old"
    (old / "images").mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"format": 1, "model_fingerprint": "abc", "model": "m"}))
    with pytest.raises(ValueError, match="older scta-search.*scta-search index --model"):
        Gallery.load(old)
    build(tmp_path, model, processor).close()
    marker = json.loads((tmp_path / "index" / MARKER).read_text())
    (tmp_path / "index" / MARKER).write_text(json.dumps({**marker, "version": 99}))
    with pytest.raises(ValueError, match="version 99.*scta-search index --model"):
        Gallery.load(tmp_path / "index")
    (tmp_path / "index" / MARKER).write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read.*rebuild"):
        Gallery.load(tmp_path / "index")
    (tmp_path / "index" / MARKER).write_text(json.dumps(marker))
    for shard in (tmp_path / "index" / SHARDS).iterdir():
        shard.unlink()
    with pytest.raises(ValueError, match="shard.*cannot be read.*rebuild"):
        Gallery.load(tmp_path / "index").search_text("a red square")


# ---------------------------------------------------------------------------------------------------------------
# Files that misbehave


def test_bad_files_are_skipped_listed_and_not_decoded_again(setup, monkeypatch):
    tmp_path, model, processor = setup
    photos = tmp_path / "photos"
    (photos / "notes.jpg").write_text("not an image")
    good = (photos / "photo00.png").read_bytes()
    (photos / "cut.png").write_bytes(good[: len(good) // 2])
    os.symlink(photos / "nowhere.png", photos / "dangling.png")
    os.symlink(photos / "loop-b.png", photos / "loop-a.png")
    os.symlink(photos / "loop-a.png", photos / "loop-b.png")
    odd = os.fsdecode(b"caf\xe9-latin1.png")  # a name that is not UTF-8
    shutil.copy(photos / "photo04.png", os.path.join(os.fsencode(str(photos)).decode("utf-8"), odd))
    gallery = build(tmp_path, model, processor)
    assert len(gallery) == 11 and any(p.endswith(odd) for p in gallery.paths)
    assert sorted(os.path.basename(p) for p in gallery.skipped) == [
        "cut.png",
        "dangling.png",
        "loop-a.png",
        "loop-b.png",
        "notes.jpg",
    ]
    read = []
    original = gallery_module.read_ahead
    monkeypatch.setattr(gallery_module, "read_ahead", lambda paths, **kw: read.extend(paths) or original(paths, **kw))
    counts = gallery.update(photos)
    assert read == [] and counts["skipped"] == 5 and counts["unchanged"] == 11
    with pytest.raises(ValueError, match="holds no image files"):
        Gallery.build(model, processor, tmp_path / "model")  # a folder without images


def test_a_folder_of_only_undecodable_files_writes_no_index(setup):
    tmp_path, model, processor = setup
    (tmp_path / "junk").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "junk" / name).write_text("not an image")
    with pytest.raises(ValueError, match="none of the 2 image files.*could be used.*no index was written"):
        build(tmp_path, model, processor, images=tmp_path / "junk")
    assert not (tmp_path / "index").exists()
    (tmp_path / "made-by-me").mkdir()  # an empty folder the user made stays, empty
    with pytest.raises(ValueError, match="no index was written"):
        build(tmp_path, model, processor, images=tmp_path / "junk", index="made-by-me")
    assert (tmp_path / "made-by-me").is_dir() and not list((tmp_path / "made-by-me").iterdir())


def test_files_deleted_or_replaced_while_indexing(setup, monkeypatch):
    tmp_path, model, processor = setup
    photos = tmp_path / "photos"
    original = gallery_module.read_ahead

    def meddling(paths, **kwargs):
        os.remove(photos / "photo06.png")  # deleted after the folder was listed, before it is read
        PIL.Image.new("RGB", (30, 30), "black").save(photos / "photo07.png")  # replaced before it is read
        os.utime(photos / "photo07.png", (3e9, 3e9))
        for file in original(paths, **kwargs):
            if file.path.endswith("photo08.png"):
                PIL.Image.new("RGB", (30, 30), "white").save(photos / "photo08.png")  # replaced after it was read
                os.utime(photos / "photo08.png", (4e9, 4e9))
            yield file

    monkeypatch.setattr(gallery_module, "read_ahead", meddling)
    gallery = build(tmp_path, model, processor, batch_size=2)
    monkeypatch.undo()
    assert len(gallery) == 9 and "vanished" in gallery.skipped[str(photos / "photo06.png")]
    counts = gallery.update(photos)
    assert counts["changed"] == 1 and counts["removed"] == 0  # photo08's new content; photo07 was read new
    fresh = Gallery.build(model, processor, photos, tmp_path / "fresh")
    for name in ("photo07.png", "photo08.png"):
        path = str(photos / name)
        assert torch.equal(gallery.tokens([gallery.paths.index(path)]), fresh.tokens([fresh.paths.index(path)]))


def test_leftovers_of_a_killed_run_are_removed(setup):
    tmp_path, model, processor = setup
    gallery = build(tmp_path, model, processor)
    shards = tmp_path / "index" / SHARDS
    (shards / ".00000007.arrow.tmp-999").write_bytes(b"half")
    shutil.copy(next(shards.iterdir()), shards / "00000099.arrow")  # written, never committed
    (tmp_path / "index" / ".scta-index.json.tmp-999").write_text("{")
    gallery.close()
    Gallery.load(tmp_path / "index", writable=True)
    assert sorted(p.name for p in shards.iterdir()) == ["00000001.arrow"]
    assert not list((tmp_path / "index").glob(".*tmp*"))


def test_large_images_are_decoded_small_and_batches_are_bounded_by_pixels(setup, monkeypatch):
    tmp_path, model, processor = setup
    big = tmp_path / "big"
    big.mkdir()
    for index in range(3):
        PIL.Image.new("RGB", (3000, 2000), (40 * index, 80, 120)).save(big / f"big{index}.jpg", quality=80)
    PIL.Image.new("RGB", (1600, 1200), "red").save(big / "big.png")
    side = gallery_module.image_side(processor.image_processor)  # 32
    jpeg = read_image_file(str(big / "big0.jpg"), draft_size=(2 * side, 2 * side), reduce_to=side)
    assert jpeg.image.size == (188, 125)  # JPEG draft at 1/8 (375 x 250), then halved while both sides stay >= 64
    png = read_image_file(str(big / "big.png"), draft_size=(2 * side, 2 * side), reduce_to=side)
    assert min(png.image.size) >= 2 * side and max(png.image.size) <= 1600 // 8
    monkeypatch.setattr(gallery_module, "PIXELS_PER_BATCH", 30_000)
    encoded = count_encoded(monkeypatch)
    gallery = build(tmp_path, model, processor, images=big, batch_size=32)
    assert len(gallery) == 4 and max(encoded) <= 2  # 188 x 125 = 23.5 K pixels: at most two per batch


# ---------------------------------------------------------------------------------------------------------------
# The command line (in this process; one subprocess smoke test in test_search_server.py)


def test_the_command_line(setup, capsys):
    tmp_path, _, _ = setup
    index = tmp_path / "index"
    status, out, err = cli(
        capsys, "index", "--model", tmp_path / "model", "--images", tmp_path / "photos", "--index", index
    )
    assert status == 0 and "Indexed 10 images" in out, err
    status, out, _ = cli(
        capsys, "index", "--model", tmp_path / "model", "--images", tmp_path / "photos", "--index", index
    )
    assert "0 new, 0 changed, 0 renamed or moved, 0 removed, 10 unchanged" in out
    status, out, _ = cli(capsys, "query", "--index", index, "a red square", "-k", "3", "--json")
    results = json.loads(out)
    assert len(results) == 3 and set(results[0]) == {"path", "score", "words"} and results[0]["words"]
    status, out, _ = cli(capsys, "query", "--index", index, "a red square", "-k", "3")
    lines = out.splitlines()
    assert len(lines) == 6 and lines[1].strip().startswith("matched: ")
    status, out, _ = cli(capsys, "query", "--index", index, "--like", tmp_path / "photos" / "photo02.png", "-k", "2")
    assert status == 0 and "photo02.png" in out.splitlines()[0]
    (tmp_path / "captions.txt").write_text("a red square\na blue square\n")
    status, out, _ = cli(
        capsys,
        "query",
        "--index",
        index,
        "--image",
        tmp_path / "photos" / "photo00.png",
        "--captions",
        tmp_path / "captions.txt",
        "--json",
    )
    assert {entry["caption"] for entry in json.loads(out)} == {"a red square", "a blue square"}
    status, out, _ = cli(capsys, "query", "--index", index, "a red square", "-k", "3", "--grid", tmp_path / "grid.png")
    assert status == 0 and f"Wrote {tmp_path / 'grid.png'}." in out and (tmp_path / "grid.png").is_file()
    status, out, _ = cli(capsys, "duplicates", "--index", index, "--threshold", "0.9999")
    assert status == 0 and "group(s) of near-duplicates" in out
    status, out, err = cli(
        capsys,
        "explain",
        tmp_path / "photos" / "photo00.png",
        "a red square",
        "--model",
        tmp_path / "model",
        "--output",
        tmp_path / "why.png",
    )
    assert status == 0 and "kept 8 of 16 patches" in out and "Wrote" in out, err
    assert PIL.Image.open(tmp_path / "why.png").size[0] > 192 * 2


@pytest.mark.parametrize(
    "args, message",
    [
        (("query", "--index", "{tmp}/nowhere", "x"), "no index at"),
        (("query", "--index", "{tmp}/photos", "x"), "not an scta-search index"),
        (("query", "--index", "{tmp}/index", "  "), "non-empty string"),
        (("query", "--index", "{tmp}/index", "x", "-k", "0"), "-k: must be >= 1"),
        (("query", "--index", "{tmp}/index", "x", "--rerank_top_k", "-1"), "must be >= 0"),
        (("query", "--index", "{tmp}/index", "--image", "{tmp}/photos/photo00.png"), "--image needs --captions"),
        (
            ("query", "--index", "{tmp}/index", "--image", "{tmp}/nope.png", "--captions", "{tmp}/c.txt"),
            "--image {tmp}/nope.png: no such file",
        ),
        (
            ("query", "--index", "{tmp}/index", "x", "--grid", "{tmp}/missing/grid.png"),
            "does not exist; create it first",
        ),
        (("query", "--index", "{tmp}/index", "x", "--faiss_factory", "garbage!"), "not a FAISS index-factory string"),
        (("query", "--index", "{tmp}/index", "x", "--device", "tpu9"), "--device 'tpu9'"),
        (("query", "--index", "{tmp}/index", "x", "--cutoff", "2"), "must be in (0, 1]"),
        (("index", "--model", "{tmp}/model", "--images", "{tmp}/model", "--index", "{tmp}/i2"), "holds no image files"),
        (
            ("index", "--model", "{tmp}/nomodel", "--images", "{tmp}/photos", "--index", "{tmp}/i2"),
            "no such model folder",
        ),
        (
            ("index", "--model", "{tmp}/model", "--images", "{tmp}/photos", "--index", "{tmp}/i2", "--batch_size", "0"),
            "must be >= 1",
        ),
        (
            ("index", "--model", "{tmp}/model", "--images", "{tmp}/photos", "--index", "{tmp}/photos/photo00.png"),
            "is a file",
        ),
        (
            ("explain", "{tmp}/nope.png", "a red square", "--model", "{tmp}/model", "--output", "{tmp}/w.png"),
            "image {tmp}/nope.png: no such file",
        ),
        (("duplicates", "--index", "{tmp}/index", "--threshold", "3"), "must be a cosine"),
        (("query", "--index", "{tmp}/index", "--like", "{tmp}/nope.png"), "--like {tmp}/nope.png: no such file"),
        (("query", "--index", "{tmp}/index", "x", "--not", "  "), "--not needs a non-empty text"),
        (("query", "--index", "{tmp}/index", "x", "--like", "{tmp}/photos/photo00.png"), "Give one of"),
        (
            (
                "index",
                "--model",
                "{tmp}/model",
                "--images",
                "{tmp}/photos",
                "--index",
                "{tmp}/i2",
                "--faiss_factory",
                "IVF?",
            ),
            "not a FAISS index-factory string",
        ),
        (
            (
                "explain",
                "{tmp}/photos/photo00.png",
                "a red square",
                "--model",
                "{tmp}/model",
                "--output",
                "{tmp}/no/w.png",
            ),
            "does not exist; create it first",
        ),
    ],
)
def test_user_errors_exit_2_with_a_message(setup, capsys, args, message):
    tmp_path, model, processor = setup
    build(tmp_path, model, processor).close()
    status, _, err = cli(capsys, *(a.format(tmp=tmp_path) for a in args))
    assert status == 2 and message.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_indexing_under_two_processes_equals_one_process(setup):
    import socket
    import subprocess
    import sys

    tmp_path, model, processor = setup
    write_photos(tmp_path / "photos", 11)  # an odd count: the processes' slices differ in size
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG broken")
    single = Gallery.build(model, processor, tmp_path / "photos")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "scta_search",
        "index",
        "--model",
        str(tmp_path / "model"),
        "--images",
        str(tmp_path / "photos"),
        "--index",
        str(tmp_path / "index"),
        "--batch_size",
        "4",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Indexed 11 images") == 1  # printed by the main process only
    both = Gallery.load(tmp_path / "index", model, processor)
    assert both.paths == single.paths and list(both.skipped) == list(single.skipped)
    assert torch.equal(both.tokens(list(range(11))), single.tokens(list(range(11))))
    assert (
        sqlite3.connect(tmp_path / "index" / "rows.sqlite").execute("SELECT count(*) FROM images").fetchone()[0] == 11
    )
    np.testing.assert_array_equal(both.unit_embeddings().numpy(), single.unit_embeddings().numpy())


def test_the_explanation_is_the_heads_own_selection_and_alignments(setup):
    from scta_search.explain import draw_explanation, explain

    tmp_path, model, processor = setup
    photo = tmp_path / "photos" / "photo04.png"
    caption = "a purple square on a plain background"
    explanation = explain(model, processor, photo, caption, matched={"purple": True})
    # the kept set, computed here from the specification (docs/METHOD.md steps 1-2) on the model's tokens
    inputs = processor(images=[read_image_file(str(photo)).image], text=[caption], return_tensors="pt")
    with torch.no_grad():
        image_tokens = model.get_image_features(inputs["pixel_values"]).last_hidden_state[0]
        words = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state[0]
        patches = image_tokens[1:]
        directions = torch.nn.functional.normalize(patches, dim=-1)
        s_self = directions @ torch.nn.functional.normalize(patches.mean(0), dim=-1)
        s_text = directions @ torch.nn.functional.normalize(words.mean(0), dim=-1)
        expected = sorted((s_self + s_text).topk(model.config.num_kept_patches).indices.tolist())
        score = model(**inputs).logits_per_image[0, 0]
        alignments = reference_pair_score(model.head, image_tokens, words, text_alignment=True)
    assert explanation.kept == expected and abs(explanation.score - float(score)) < 1e-4
    torch.testing.assert_close(torch.tensor([w.alignment for w in explanation.words]), alignments, atol=1e-5, rtol=0)
    for word in explanation.words:
        assert word.region_alignment <= word.alignment + 1e-6 and word.image_key in ("[CLS]", word.region)
        if word.region.startswith("slot"):  # a patch slot weighs kept patches only
            assert (word.heat.reshape(-1)[[i for i in range(16) if i not in expected]] == 0).all()
        else:  # the fused token weighs dropped patches only
            assert (word.heat.reshape(-1)[expected] == 0).all()
    # the picture's first panel: kept patches as they are, fused ones at 0.3 of their brightness
    draw_explanation(explanation, caption, tmp_path / "explain.png", side=224)
    drawn = torch.tensor(np.asarray(PIL.Image.open(tmp_path / "explain.png").convert("RGB")), dtype=torch.float32)
    base = torch.tensor(np.asarray(explanation.image.resize((224, 224), PIL.Image.NEAREST)), dtype=torch.float32)
    top, left, cell = 30, 8, 56  # the panel's place in the canvas (header, margin), 224 / 4 per patch
    for index in range(16):
        row, column = divmod(index, 4)
        inner = (slice(row * cell + 8, row * cell + 20), slice(column * cell + 30, column * cell + 48))  # off the cross
        panel = drawn[top + inner[0].start : top + inner[0].stop, left + inner[1].start : left + inner[1].stop]
        original = base[inner]
        if index in expected:
            assert torch.equal(panel, original), index
        else:
            torch.testing.assert_close(panel, (original * 0.3).floor(), atol=1.0, rtol=0)
