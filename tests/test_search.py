"""scta-search: the Gallery API, the index on disk (incremental, atomic, model-checked, bad images), the CLI."""

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

import search_scta
from configuration_scta import SCTAConfig
from modeling_scta import SCTAModel
from processing_scta import SCTAProcessor, train_wordpiece_tokenizer
from search_scta import Gallery
from tiny_models import tiny_bert_config, tiny_vit_config


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta"]
CAPTIONS = [f"a {colour} square on a plain background" for colour in COLOURS]


def save_model(folder, seed=0):
    tokenizer = train_wordpiece_tokenizer(CAPTIONS + ["a circle at the top", "two dogs"], vocab_size=90)
    processor = SCTAProcessor.from_tokenizer(tokenizer, image_size=32)
    torch.manual_seed(seed)
    config = SCTAConfig.from_vision_text_configs(tiny_vit_config(), tiny_bert_config(len(tokenizer)), embed_size=24)
    model = SCTAModel(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def write_photos(folder, count=10):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = PIL.Image.new("RGB", (40 + index, 36), COLOURS[index % len(COLOURS)])
        image.paste((255, 255, 255), (index, index, index + 8, index + 8))
        image.save(folder / f"photo{index:02d}.png")


@pytest.fixture()
def setup(tmp_path):
    model, processor = save_model(tmp_path / "model")
    write_photos(tmp_path / "photos")
    return tmp_path, model, processor


def test_text_search_is_the_heads_ranking_and_two_stage_agrees_when_k_covers_the_gallery(setup):
    tmp_path, model, processor = setup
    gallery = Gallery.build(model, processor, tmp_path / "photos", tmp_path / "index", model_name_or_path=str(tmp_path / "model"))
    assert len(gallery) == 10 and all(path.endswith(".png") for path in gallery.paths)
    exhaustive = gallery.search_text("a blue square on a plain background", k=10, rerank_top_k=0)
    assert [r.score for r in exhaustive] == sorted((r.score for r in exhaustive), reverse=True)
    # the same scores as the model on the decoded images (tokens stored in float16)
    images = [search_scta.load_image(r.path) for r in exhaustive]
    inputs = processor(images=images, text=["a blue square on a plain background"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image[:, 0]
    torch.testing.assert_close(torch.tensor([r.score for r in exhaustive]), expected, atol=5e-3, rtol=0)
    covering = gallery.search_text("a blue square on a plain background", k=10, rerank_top_k=10)
    assert [r.path for r in covering] == [r.path for r in exhaustive]
    assert len(gallery.search_text("a blue square", k=3, rerank_top_k=4)) == 3
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="non-empty string"):
            gallery.search_text(bad)


def test_ranking_captions_for_one_image(setup):
    tmp_path, model, processor = setup
    gallery = Gallery.build(model, processor, tmp_path / "photos")
    photo = tmp_path / "photos" / "photo03.png"
    ranked = gallery.search_image(photo, CAPTIONS[:4], k=3)
    inputs = processor(images=[search_scta.load_image(photo)], text=CAPTIONS[:4], return_tensors="pt")
    with torch.no_grad():
        scores = model(**inputs).logits_per_image[0]
    assert [caption for caption, _ in ranked] == [CAPTIONS[i] for i in scores.argsort(descending=True)[:3]]


def test_reindexing_encodes_only_new_or_changed_files_and_drops_deleted_ones(setup, monkeypatch):
    tmp_path, model, processor = setup
    gallery = Gallery.build(model, processor, tmp_path / "photos", tmp_path / "index", model_name_or_path=str(tmp_path / "model"))
    encoded = []
    original = search_scta.encode_images
    monkeypatch.setattr(search_scta, "encode_images", lambda m, p, paths, *a, **k: encoded.append(list(paths)) or original(m, p, paths, *a, **k))
    assert gallery.update(tmp_path / "photos") == {"unchanged": 10, "new": 0, "changed": 0, "removed": 0}
    assert encoded == []
    write_photos(tmp_path / "more", 1)
    os.replace(tmp_path / "more" / "photo00.png", tmp_path / "photos" / "new.png")
    PIL.Image.new("RGB", (50, 50), "black").save(tmp_path / "photos" / "photo01.png")  # changed
    os.utime(tmp_path / "photos" / "photo01.png", (1e9, 1e9))
    os.remove(tmp_path / "photos" / "photo02.png")  # deleted
    counts = Gallery.load(tmp_path / "index", model, processor).update(tmp_path / "photos")
    assert counts == {"unchanged": 8, "new": 1, "changed": 1, "removed": 1}
    assert sorted(os.path.basename(p) for p in encoded[0]) == ["new.png", "photo01.png"]
    reloaded = Gallery.load(tmp_path / "index", model, processor)
    names = sorted(os.path.basename(p) for p in reloaded.paths)
    assert len(names) == 10 and "photo02.png" not in names and "new.png" in names
    # the re-encoded file's tokens are those of its new content
    fresh = Gallery.build(model, processor, [tmp_path / "photos" / "photo01.png"])
    row = reloaded.paths.index(str((tmp_path / "photos" / "photo01.png").resolve()))
    assert torch.equal(reloaded._tokens([row]), fresh._tokens([0]))


def test_an_index_of_another_model_is_refused(setup):
    tmp_path, model, processor = setup
    Gallery.build(model, processor, tmp_path / "photos", tmp_path / "index", model_name_or_path=str(tmp_path / "model"))
    other, other_processor = save_model(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="was built by another model"):
        Gallery.load(tmp_path / "index", other, other_processor)


def test_an_interrupted_indexing_run_leaves_the_previous_index(setup, monkeypatch):
    tmp_path, model, processor = setup
    Gallery.build(model, processor, tmp_path / "photos", tmp_path / "index", model_name_or_path=str(tmp_path / "model"))
    before = Gallery.load(tmp_path / "index").paths
    write_photos(tmp_path / "photos2", 3)
    gallery = Gallery.build(model, processor, tmp_path / "photos2")

    def killed(self, path, *args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", killed)
    with pytest.raises(KeyboardInterrupt):
        gallery.save(tmp_path / "index")
    monkeypatch.undo()
    assert Gallery.load(tmp_path / "index").paths == before  # still the complete previous index
    with pytest.raises(ValueError, match="is not an SCTA image index"):
        gallery.save(tmp_path / "photos")  # never replaces a folder that is not an index


def test_bad_images_are_skipped_listed_and_counted(setup):
    tmp_path, model, processor = setup
    (tmp_path / "photos" / "notes.jpg").write_text("not an image")
    good = (tmp_path / "photos" / "photo00.png").read_bytes()
    (tmp_path / "photos" / "cut.png").write_bytes(good[: len(good) // 2])
    gallery = Gallery.build(model, processor, tmp_path / "photos")
    assert len(gallery) == 10
    assert sorted(os.path.basename(p) for p in gallery.manifest["skipped"]) == ["cut.png", "notes.jpg"]
    with pytest.raises(ValueError, match="holds no image files"):
        Gallery.build(model, processor, tmp_path / "model")  # a folder without images


def test_the_command_line(setup):
    tmp_path, _, _ = setup
    run = lambda *args: subprocess.run([sys.executable, "-m", "search_scta", *args], capture_output=True, text=True,
                                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    for command in ("index", "query", "explain"):
        assert run(command, "--help").returncode == 0
    indexed = run("index", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "photos"), "--index", str(tmp_path / "index"))
    assert indexed.returncode == 0 and "Indexed 10 images" in indexed.stdout, indexed.stderr[-2000:]
    again = run("index", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "photos"), "--index", str(tmp_path / "index"))
    assert "0 new, 0 changed, 0 removed, 10 unchanged" in again.stdout
    queried = run("query", "--index", str(tmp_path / "index"), "a red square", "-k", "3", "--json")
    results = json.loads(queried.stdout)
    assert len(results) == 3 and set(results[0]) == {"path", "score"}
    (tmp_path / "captions.txt").write_text("a red square\na blue square\n")
    ranked = run("query", "--index", str(tmp_path / "index"), "--image", str(tmp_path / "photos" / "photo00.png"),
                 "--captions", str(tmp_path / "captions.txt"), "--json")  # fmt: skip
    assert {entry["caption"] for entry in json.loads(ranked.stdout)} == {"a red square", "a blue square"}
    for args, message in [
        (("query", "--index", str(tmp_path / "nowhere"), "x"), "is not an SCTA image index"),
        (("query", "--index", str(tmp_path / "index"), "  "), "non-empty string"),
        (("index", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "model"), "--index", str(tmp_path / "i2")), "holds no image files"),
    ]:
        failed = run(*args)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr[-2000:]
    explained = run("explain", str(tmp_path / "photos" / "photo00.png"), "a red square", "--model", str(tmp_path / "model"),
                    "--output", str(tmp_path / "why.png"))  # fmt: skip
    assert explained.returncode == 0 and "kept 8 of 16 patches" in explained.stdout, explained.stderr[-2000:]
    assert PIL.Image.open(tmp_path / "why.png").size[0] > 224
    queried = run("query", "--index", str(tmp_path / "index"), "a red square", "-k", "3", "--grid", str(tmp_path / "grid.png"))
    assert queried.returncode == 0 and len(queried.stdout.splitlines()) == 3 and (tmp_path / "grid.png").is_file()
    save_model(tmp_path / "other", seed=1)
    mixed = run("index", "--model", str(tmp_path / "other"), "--images", str(tmp_path / "photos"), "--index", str(tmp_path / "index"))
    assert mixed.returncode == 2 and "was built by another model" in mixed.stderr


def test_the_faiss_first_stage_equals_the_exact_one(setup, monkeypatch):
    pytest.importorskip("faiss", reason="the FAISS first stage needs faiss-cpu (pip install -e '.[search]')")
    tmp_path, model, processor = setup
    gallery = Gallery.build(model, processor, tmp_path / "photos")
    query = torch.nn.functional.normalize(torch.randn(24), dim=-1)
    with_faiss = gallery.first_stage(query, 4)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails: the matrix-product fallback
    assert gallery.first_stage(query, 4) == with_faiss


def test_the_explanation_draws_the_heads_own_kept_patches(setup):
    tmp_path, model, processor = setup
    photo = tmp_path / "photos" / "photo04.png"
    caption = "a purple square on a plain background"
    explanation = search_scta.explain(model, processor, photo, caption)
    # the kept set, computed here from the specification (METHOD.md steps 1-2) on the model's tokens
    inputs = processor(images=[search_scta.load_image(photo)], text=[caption], return_tensors="pt")
    with torch.no_grad():
        patches = model.get_image_features(inputs["pixel_values"]).last_hidden_state[0, 1:]
        words = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state[0]
        directions = torch.nn.functional.normalize(patches, dim=-1)
        s_self = directions @ torch.nn.functional.normalize(patches.mean(0), dim=-1)
        s_text = directions @ torch.nn.functional.normalize(words.mean(0), dim=-1)
        expected = sorted((s_self + s_text).topk(model.config.num_kept_patches).indices.tolist())
        score = model(**inputs).logits_per_image[0, 0]
    assert explanation.kept == expected and abs(explanation.score - float(score)) < 1e-4
    assert explanation.slot_maps.shape == (model.config.num_patch_slots, 16)
    assert (explanation.slot_maps[:, [i for i in range(16) if i not in expected]] == 0).all()  # only kept patches
    assert len(explanation.word_slots) == 1 + int(model.head.word_slot_counts(inputs["attention_mask"].sum(1))[0])
    # the picture's first panel: kept patches as they are, fused ones at 0.3 of their brightness
    search_scta.draw_explanation(explanation, caption, tmp_path / "explain.png", side=224)
    drawn = torch.tensor(np.asarray(PIL.Image.open(tmp_path / "explain.png").convert("RGB")), dtype=torch.float32)
    base = torch.tensor(np.asarray(explanation.image.resize((224, 224), PIL.Image.NEAREST)), dtype=torch.float32)
    top, left, cell = 26, 8, 56  # the panel's place in the canvas (label + 8, margin), 224 / 4 per patch
    for index in range(16):
        row, column = divmod(index, 4)
        inner = (slice(row * cell + 8, row * cell + 20), slice(column * cell + 30, column * cell + 48))  # off the cross
        panel = drawn[top + inner[0].start : top + inner[0].stop, left + inner[1].start : left + inner[1].stop]
        original = base[inner]
        if index in expected:
            assert torch.equal(panel, original), index
        else:
            torch.testing.assert_close(panel, (original * 0.3).floor(), atol=1.0, rtol=0)


def test_indexing_under_two_processes_equals_one_process(setup):
    tmp_path, model, processor = setup
    write_photos(tmp_path / "photos", 11)  # an odd count: the processes' slices differ in size
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG broken")
    single = Gallery.build(model, processor, tmp_path / "photos")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "search_scta", "index", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "photos"),
               "--index", str(tmp_path / "index"), "--batch_size", "4"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Indexed 11 images") == 1  # printed by the main process only
    both = Gallery.load(tmp_path / "index", model, processor)
    assert both.paths == single.paths and list(both.manifest["skipped"]) == list(single.manifest["skipped"])
    assert torch.equal(both._tokens(range(11)), single._tokens(range(11)))


def test_an_approximate_faiss_index_from_a_factory_string(setup):
    pytest.importorskip("faiss", reason="needs faiss-cpu")
    tmp_path, model, processor = setup
    gallery = Gallery.build(model, processor, tmp_path / "photos")
    exact = gallery.search_text("a green square", k=3, rerank_top_k=10)
    gallery.faiss_factory = "HNSW32"
    approximate = gallery.search_text("a green square", k=3, rerank_top_k=10)  # 10 of 10 images: the same
    assert [r.path for r in approximate] == [r.path for r in exact]
