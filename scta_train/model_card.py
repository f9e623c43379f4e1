"""The model card of a trained SCTA model: Hub metadata (library, pipeline, tags, datasets, base models and a
`model-index` with the recall results) and SCTA's results, settings and usage before the Trainer's training log."""

from huggingface_hub import EvalResult, ModelCard

from configuration_scta import HEAD_SETTINGS, SCTAConfig
from scta_train.results import render_run_results


TAGS = ["scta", "image-text-retrieval", "cross-modal-retrieval"]
# model-index entries: metric key suffix -> (metric type, human name)
RECALL_ENTRIES = {
    f"r{k}_{direction}": (f"recall@{k}_{direction}", f"R@{k} {'image→text' if direction == 'i2t' else 'text→image'}")
    for direction in ("i2t", "t2i")
    for k in (1, 5, 10)
}
RECALL_ENTRIES["rsum"] = ("rsum", "rsum")


def eval_results(retrieval_results: dict, dataset_name: str, dataset_id: str | None) -> list[EvalResult]:
    """`model-index` results: one per metric of each evaluated split."""
    results = []
    for prefix, metrics in retrieval_results.items():
        split = {"eval": "validation", "test": "test"}.get(prefix, prefix)
        for suffix, (metric_type, metric_name) in RECALL_ENTRIES.items():
            key = f"{prefix}_{suffix}"
            if key in metrics:
                results.append(
                    EvalResult(
                        task_type="image-text-retrieval",
                        task_name="Image-text retrieval",
                        dataset_type=dataset_id or dataset_name,
                        dataset_name=dataset_name,
                        dataset_split=split,
                        metric_type=metric_type,
                        metric_name=f"{metric_name} ({split})",
                        metric_value=round(metrics[key], 2),
                    )
                )
    return results


def card_section(config: SCTAConfig, retrieval_results: dict) -> str:
    """Results tables, the towers and head settings, and how to use the model."""
    lines = ["# SCTA image-text retrieval model", ""]
    for prefix, metrics in retrieval_results.items():
        lines += [render_run_results(metrics, prefix, markdown=True), ""]
    settings = {name: getattr(config, name) for name in HEAD_SETTINGS}
    lines += [
        "## Configuration",
        "",
        f"- image tower: `{config.vision_config.model_type}` ({config.num_patches} patches"
        f"{' + [CLS]' if config.vision_has_cls_token else ''}), text tower: `{config.text_config.model_type}`",
        "- head: " + ", ".join(f"`{name}={value}`" for name, value in settings.items()),
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel, AutoProcessor",
        "",
        'model = AutoModel.from_pretrained("<this repo>", trust_remote_code=True).eval()',
        'processor = AutoProcessor.from_pretrained("<this repo>", trust_remote_code=True)',
        'inputs = processor(images=images, text=["a dog runs on the beach"], return_tensors="pt")',
        "with torch.no_grad():",
        "    scores = model(**inputs).logits_per_image  # (images, captions)",
        "```",
        "",
        "`trust_remote_code=True` runs this repo's `configuration_scta.py`, `modeling_scta.py` and "
        '`processing_scta.py`; read them, and pin a reviewed commit with `revision="<commit sha>"`.',
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    card_path,
    config: SCTAConfig,
    retrieval_results: dict,
    model_name: str,
    dataset_name: str,
    dataset_id: str | None = None,
    base_models: list[str] | None = None,
) -> None:
    """Rewrite the Trainer's `README.md` at `card_path`: SCTA's metadata merged into its front matter, SCTA's
    section before its body."""
    card = ModelCard.load(card_path)
    data = card.data
    data.library_name = "transformers"
    data.pipeline_tag = "zero-shot-image-classification"  # what transformers' pipeline runs with this model
    data.tags = sorted(set(data.tags or []) | set(TAGS))
    if dataset_id:
        data.datasets = [dataset_id]
    if base_models:
        data.base_model = base_models if len(base_models) > 1 else base_models[0]
    data.model_name = model_name
    data.eval_results = eval_results(retrieval_results, dataset_name, dataset_id) or None
    card.text = "\n" + card_section(config, retrieval_results) + "\n" + card.text
    card.save(card_path)
