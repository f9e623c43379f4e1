"""Faults and bad input during training: a killed run resumes to the same model, torn checkpoints are never
picked, non-finite losses are skipped and counted, undecodable images fail clearly or are skipped and counted."""

import json
import os
import signal
import subprocess
import sys
import time

import datasets
import pytest
import torch
from safetensors.torch import load_file

import scta_train.loss
from helpers import REPO, run_main, tiny_run_config, write_config
from modeling_scta import scta_with_global_loss
from scta_train.arguments import parse_arguments
from scta_train.data import load_retrieval_dataset
from scta_train.models import build_model, build_processor
from scta_train.trainer import SCTATrainer, is_complete_checkpoint, last_complete_checkpoint


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def _quality(results: dict) -> dict:
    return {
        name: value
        for name, value in results.items()
        if name.startswith(("eval_", "test_")) and not name.endswith(("runtime", "per_second"))
    }


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_model_and_metrics(tmp_path, synthetic_dir):
    settings = {"num_train_epochs": 3, "save_total_limit": None}
    uninterrupted = run_main(
        [write_config(tmp_path / "a.json", tiny_run_config(synthetic_dir, str(tmp_path / "a"), **settings))]
    )

    killed_dir = tmp_path / "b"
    config_path = write_config(tmp_path / "b.json", tiny_run_config(synthetic_dir, str(killed_dir), **settings))
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "run_retrieval.py"), config_path],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    first_checkpoint = killed_dir / "checkpoint-15"
    deadline = time.time() + 600
    while not is_complete_checkpoint(str(first_checkpoint)):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "test_results.json").exists(), "the run was killed after it finished"

    # A checkpoint cut off while it was written: weights but no trainer_state.json.
    torn = killed_dir / "checkpoint-40"
    torn.mkdir(exist_ok=True)
    (torn / "model.safetensors").write_bytes(b"\0" * 64)
    assert last_complete_checkpoint(str(killed_dir)) != str(torn)

    resumed = run_main(
        [
            write_config(
                tmp_path / "b2.json",
                tiny_run_config(synthetic_dir, str(killed_dir), resume_from_checkpoint="last", **settings),
            )
        ]
    )
    final_a, final_b = _weights(tmp_path / "a"), _weights(killed_dir)
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
    assert _quality(resumed) == _quality(uninterrupted)


def test_torn_checkpoints_are_never_resumed_from(tmp_path):
    good = tmp_path / "checkpoint-10"
    good.mkdir()
    (good / "model.safetensors").write_bytes(b"weights")
    (good / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    truncated = tmp_path / "checkpoint-20"
    truncated.mkdir()
    (truncated / "model.safetensors").write_bytes(b"weights")
    (truncated / "trainer_state.json").write_text('{"global_step": 2')  # cut off mid-write
    no_state = tmp_path / "checkpoint-30"
    no_state.mkdir()
    (no_state / "model.safetensors").write_bytes(b"weights")
    no_weights = tmp_path / "checkpoint-40"
    no_weights.mkdir()
    (no_weights / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(good)
    assert last_complete_checkpoint(str(tmp_path / "nothing-here")) is None


def test_resuming_from_a_torn_or_missing_checkpoint_is_an_error(tmp_path, synthetic_dir):
    torn = tmp_path / "out" / "checkpoint-5"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"weights")
    config = tiny_run_config(synthetic_dir, str(tmp_path / "out"), resume_from_checkpoint=str(torn))
    with pytest.raises(ValueError, match="is not a complete checkpoint folder"):
        run_main([write_config(tmp_path / "a.json", config)])
    config = tiny_run_config(synthetic_dir, str(tmp_path / "empty"), resume_from_checkpoint="last")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        run_main([write_config(tmp_path / "b.json", config)])


# ---------------------------------------------------------------------------------------------- non-finite loss


@pytest.fixture
def poisoned_loss(monkeypatch):
    """Make the training loss (`scta_with_global_loss`) non-finite on the chosen (1-based) calls."""
    original = scta_with_global_loss

    def install(poisoned_calls):
        calls = []

        def poisoned(*args, **kwargs):
            calls.append(None)
            loss, global_loss = original(*args, **kwargs)
            return (loss * float("nan") if len(calls) in poisoned_calls else loss), global_loss

        monkeypatch.setattr(scta_train.loss, "scta_with_global_loss", poisoned)

    return install


def test_a_non_finite_loss_skips_the_step_and_is_counted(tmp_path, synthetic_dir, poisoned_loss):
    poisoned_loss({3, 4})
    config = tiny_run_config(
        synthetic_dir,
        str(tmp_path / "out"),
        num_train_epochs=1,
        do_eval=False,
        do_predict=False,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        logging_steps=1,
    )
    results = run_main([write_config(tmp_path / "run.json", config)])
    assert results["nonfinite_loss_steps"] == 2
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["nonfinite_loss_steps"] for entry in logged[:5]] == [0, 0, 1, 2, 2]
    assert all(entry["grad_norm"] == 0.0 for entry in logged[2:4]), "a skipped step has no gradient"


def test_a_skipped_step_leaves_the_weights_unchanged(tmp_path, synthetic_dir, poisoned_loss):
    from modeling_scta import SCTAModel
    from scta_train.processing import RetrievalCollator

    poisoned_loss({1})
    model_args, data_args, training_args = parse_arguments(
        [write_config(tmp_path / "run.json", tiny_run_config(synthetic_dir, str(tmp_path / "out")))]
    )
    dataset = load_retrieval_dataset(data_args, training_args)
    processor = build_processor(model_args, dataset, "train")
    model = build_model(model_args, processor)
    trainer = SCTATrainer(model=model, args=training_args, eval_dataset=dataset["dev"])
    trainer.create_optimizer()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    batch = RetrievalCollator(processor.tokenizer.pad_token_id)(
        [{"pixel_values": torch.randn(3, 32, 32), "input_ids": [2, 7, 8, 3], "image_id": i} for i in range(4)]
    )
    trainer.state.epoch = 1.5
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    loss = trainer.training_step(model, batch)
    trainer.optimizer.step()
    assert loss.item() == 0.0 and trainer.nonfinite_loss_steps == 1
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), f"{name} changed in a skipped step"
    assert isinstance(model, SCTAModel)


def test_repeated_non_finite_losses_stop_the_run(tmp_path, synthetic_dir, poisoned_loss):
    poisoned_loss(set(range(1, 1000)))
    config = tiny_run_config(
        synthetic_dir,
        str(tmp_path / "out"),
        num_train_epochs=1,
        max_nonfinite_steps=3,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    with pytest.raises(FloatingPointError, match="non-finite in 3 consecutive steps"):
        run_main([write_config(tmp_path / "run.json", config)])


# ---------------------------------------------------------------------------------------------- bad images


@pytest.fixture
def dataset_with_a_broken_image(tmp_path, synthetic_dir):
    """The synthetic set with the train image of row 5 truncated, as a dataset built elsewhere might hold."""
    dataset = datasets.load_from_disk(synthetic_dir)
    train = dataset["train"].cast_column("image", datasets.Image(decode=False))
    broken = {"bytes": train[5]["image"]["bytes"][:40], "path": None}
    train = train.map(lambda row, index: {"image": broken} if index == 5 else {}, with_indices=True)
    dataset["train"] = train.cast_column("image", datasets.Image())
    path = tmp_path / "broken"
    dataset.save_to_disk(str(path))
    return str(path)


def test_a_broken_training_image_stops_with_a_clear_error(tmp_path, dataset_with_a_broken_image):
    config = tiny_run_config(dataset_with_a_broken_image, str(tmp_path / "out"), num_train_epochs=1)
    with pytest.raises(ValueError, match=r"row 5 .*on_bad_image"):
        run_main([write_config(tmp_path / "run.json", config)])


def test_a_broken_training_image_is_skipped_and_counted_on_request(tmp_path, dataset_with_a_broken_image, caplog):
    config = tiny_run_config(
        dataset_with_a_broken_image,
        str(tmp_path / "out"),
        num_train_epochs=1,
        on_bad_image="skip",
        do_eval=False,
        do_predict=False,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    with caplog.at_level("WARNING"):
        run_main([write_config(tmp_path / "run.json", config)])
    skipped = [record for record in caplog.records if "Skipping pair" in record.getMessage()]
    assert len(skipped) == 5  # the image's 5 pairs, once each in the epoch
    assert "5 pairs skipped so far" in skipped[-1].getMessage()


def test_a_collapse_is_counted_and_reported_once_per_episode(caplog):
    """Scores equal across the batch (a collapsed model: the loss sits at 2 x batch x margin) are counted every step
    and reported once after COLLAPSE_STEPS_TO_WARN in a row; a step with spread scores ends the episode."""
    import types

    from scta_train.trainer import COLLAPSE_STEPS_TO_WARN

    trainer = SCTATrainer.__new__(SCTATrainer)  # only the collapse watch's state
    trainer.collapsed_steps = trainer.consecutive_collapsed_steps = 0
    trainer.state = types.SimpleNamespace(global_step=512)
    with caplog.at_level("WARNING"):
        for _ in range(COLLAPSE_STEPS_TO_WARN + 5):
            trainer._watch_collapse(torch.full((64, 64), 0.37) + 1e-7 * torch.rand(64, 64))
    assert trainer.collapsed_steps == COLLAPSE_STEPS_TO_WARN + 5
    assert caplog.text.count("has collapsed") == 1 and "Step 512" in caplog.text
    trainer._watch_collapse(torch.rand(64, 64))  # a normal step: the episode ends
    assert trainer.consecutive_collapsed_steps == 0 and trainer.collapsed_steps == COLLAPSE_STEPS_TO_WARN + 5


def test_a_ranking_collapse_without_equal_scores_is_counted_and_reported_once_per_episode(caplog):
    """A model whose scores differ but rank the batch at chance (as a run at too high a learning rate did: in-batch
    R@1 36% falling to 1.6%, chance 1.6%, its loss at the hinge's 25.6) has collapsed: counted once the last
    COLLAPSE_STEPS_TO_WARN steps average at most twice chance, reported once; the start of a run, at chance before
    it has learnt, is not; a return to ranking ends the episode."""
    import collections
    import types

    from scta_train.trainer import COLLAPSE_STEPS_TO_WARN, batch_chance_recall

    trainer = SCTATrainer.__new__(SCTATrainer)  # only the ranking watch's state
    trainer.chance_ranking_steps, trainer.best_ranking, trainer.ranking_collapse_reported = 0, 0.0, False
    trainer.recent_rankings = collections.deque(maxlen=COLLAPSE_STEPS_TO_WARN)
    trainer.state = types.SimpleNamespace(global_step=0)
    ids = torch.arange(64)
    chance = batch_chance_recall(ids)
    assert chance == pytest.approx(1 / 64)
    assert batch_chance_recall(torch.tensor([0, 0, 1, 2])) == pytest.approx(6 / 16)  # pairs 0 and 1: one image

    def steps(recall, count):
        for _ in range(count):
            trainer.state.global_step += 1
            trainer._watch_ranking(recall, chance)

    with caplog.at_level("WARNING"):
        steps(1 / 64, 3 * COLLAPSE_STEPS_TO_WARN)  # the start: at chance, nothing learnt yet
        assert trainer.chance_ranking_steps == 0
        steps(0.36, 50)  # learnt to rank
        steps(1 / 64, COLLAPSE_STEPS_TO_WARN - 1)  # the window still holds a good step
        assert trainer.chance_ranking_steps == 0
        steps(1 / 64, 10)
    assert trainer.chance_ranking_steps == 10
    assert caplog.text.count("ranked no better than chance") == 1
    assert "in-batch R@1 1.6%" in caplog.text and "up to 23 times chance" in caplog.text
    steps(0.5, 1)  # a good step lifts the window's mean above twice chance: the episode ends
    assert trainer.chance_ranking_steps == 10 and not trainer.ranking_collapse_reported


def test_batch_recall_counts_any_caption_of_the_same_image_as_a_hit():
    """In-batch R@1 (logged as batch_r1): pairs 0 and 1 show one image, so either caption is right for it; a row
    whose best column shows another image is a miss; both directions are averaged."""
    from scta_train.trainer import batch_recall_at_1

    image_ids = torch.tensor([7, 7, 3, 5])
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0],  # image 7: best caption is pair 1's, also image 7: a hit
            [0.9, 0.1, 0.0, 0.0],  # a hit
            [0.0, 0.0, 0.2, 0.8],  # image 3: best caption shows image 5: a miss
            [0.0, 0.0, 0.1, 0.9],  # a hit
        ]
    )
    # images -> captions: 3 of 4; captions -> images (column argmax): rows 1, 0, 2, 3: hit, hit, hit, hit
    assert batch_recall_at_1(scores, image_ids) == pytest.approx((3 / 4 + 4 / 4) / 2)
    assert batch_recall_at_1(torch.eye(4), torch.arange(4)) == 1.0
