"""
Training-step benchmark of `SCTAModel`: seconds per step, samples/s, the head's share, checkpointing and bf16.

A step is what the trainer does per batch: `model(pixel_values, input_ids, attention_mask, return_loss=True)`,
`loss.backward()`, gradient clipping (max norm 2.0) and an AdamW step (docs/METHOD.md "Recipe"). Presets:
- `tiny`: the towers of `configs/demo_synthetic.json` where that file exists, else a tiny ViT (64 px, patch 8,
  width 128) and a tiny BERT (width 128); override either with `--vision-config` / `--text-config` (JSON);
- `full`: ViT-B/16 at 224 px + BERT-base, randomly initialised, embed_size 512 and the paper's head (the
  `SCTAConfig()` default).
Captions are random token ids with lengths drawn from the Flickr30K test captions (words + 2); images are random
pixels. Variants: `fp32`; `checkpointing` (`model.gradient_checkpointing_enable()`, the towers recompute their
layers in the backward); `bf16` (`torch.autocast(bfloat16)` around the forward); `checkpointing+bf16`.

Per variant, in a fresh process (so that peak memory is its own, see `benchlib.PeakMemory`):
- `--warmup` untimed steps (they also create AdamW's state), then `--steps` timed plain steps: median seconds,
  samples/s, and the peak resident set (and CUDA max allocated) during the timed steps;
- `--breakdown-steps` steps split at the head, each part timed on its own: image tower forward, text tower forward,
  head forward (`similarity` + loss on detached tower outputs), head backward, image tower backward, text tower
  backward, clipping + optimizer. The same arithmetic as a plain step, cut where the head's input gradients are
  handed to the towers' backward; the head's share of the step is (head forward + head backward) / the parts' sum.

Full size on a 2-core CPU takes about a minute a step; lower `--steps` / `--variants` for a first look.
"""

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, ViTConfig

import benchlib
from benchlib import (
    REPO,
    PeakMemory,
    caption_token_counts,
    draw_lengths,
    format_table,
    logger,
    machine_info,
    run_isolated,
    set_threads,
    summarize_seconds,
    synchronize,
    write_json,
)
from configuration_scta import SCTAConfig
from modeling_scta import SCTAModel, scta_loss


DEMO_CONFIG = REPO / "configs/demo_synthetic.json"
VARIANTS = ("fp32", "checkpointing", "bf16", "checkpointing+bf16")
BREAKDOWN_PARTS = (
    "image_tower_forward",
    "text_tower_forward",
    "head_forward",
    "head_backward",
    "image_tower_backward",
    "text_tower_backward",
    "clip_and_optimizer",
)
# The recipe's optimiser (docs/METHOD.md "Recipe"); the backbones' lower learning rate does not change the cost.
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 2e-4, 1e-4, 2.0


# ----------------------------------------------------------------------------------------------------------------
# Configurations


def builtin_tiny_towers() -> tuple[dict, dict, int]:
    """A tiny ViT (64 px, patch 8 -> 64 patches, width 128) and BERT (width 128), embed_size 128."""
    vision = {
        "model_type": "vit",
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 512,
    }
    text = {
        "model_type": "bert",
        "vocab_size": 8192,
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 128,
    }
    return vision, text, 128


def tiny_towers() -> tuple[dict, dict, int, str]:
    """The demo config's towers where `configs/demo_synthetic.json` exists, else `builtin_tiny_towers`."""
    if DEMO_CONFIG.is_file():
        demo = json.loads(DEMO_CONFIG.read_text(encoding="utf-8"))
        if "vision_config" in demo and "text_config" in demo:
            text = {
                **demo["text_config"],
                "vocab_size": demo.get("vocab_size", demo["text_config"].get("vocab_size", 8192)),
            }
            return demo["vision_config"], text, demo.get("embed_size", 512), str(DEMO_CONFIG.relative_to(REPO))
    return (*builtin_tiny_towers(), "built-in tiny towers")


def tower_config(spec: dict, default_type: str):
    spec = dict(spec)
    model_type = spec.pop("model_type", default_type)
    config_class = {"vit": ViTConfig, "bert": BertConfig}.get(model_type)
    if config_class is None:
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type, **spec)
    return config_class(**spec)


def scta_config(job: dict) -> SCTAConfig:
    if job["preset"] == "full" and not job["vision_override"] and not job["text_override"]:
        return SCTAConfig()  # ViT-B/16 224 + BERT-base + the paper's head
    if job["preset"] == "full":
        vision, text, embed_size = {"model_type": "vit"}, {"model_type": "bert"}, 512
    else:
        vision, text, embed_size, _ = tiny_towers()
    vision = tower_config({**vision, **job["vision_override"]}, "vit")
    text = tower_config({**text, **job["text_override"]}, "bert")
    return SCTAConfig.from_vision_text_configs(vision, text, embed_size=job["embed_size"] or embed_size)


def make_batch(config: SCTAConfig, job: dict, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(job["seed"])
    batch, vision, text = job["batch_size"], config.vision_config, config.text_config
    lengths = torch.tensor([min(n, text.max_position_embeddings) for n in job["lengths"]])
    max_length = int(lengths.max())
    attention_mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(5, text.vocab_size, (batch, max_length), generator=generator) * attention_mask
    pixel_values = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    return {
        "pixel_values": pixel_values.to(device),
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "image_ids": torch.arange(batch, device=device),
    }


# ----------------------------------------------------------------------------------------------------------------
# Steps


def plain_step(model, optimizer, batch, precision) -> float:
    optimizer.zero_grad(set_to_none=True)
    with precision():
        loss = model(**batch, return_loss=True).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    return float(loss.detach())


def breakdown_step(model, optimizer, batch, precision, device) -> dict:
    """One step cut at the head: each part's wall seconds (same arithmetic as `plain_step`)."""
    seconds = {}

    @contextlib.contextmanager
    def part(name):
        synchronize(device)
        start = time.perf_counter()
        yield
        synchronize(device)
        seconds[name] = time.perf_counter() - start

    optimizer.zero_grad(set_to_none=True)
    with part("image_tower_forward"), precision():
        image_embeds = model.get_image_features(batch["pixel_values"]).last_hidden_state
    with part("text_tower_forward"), precision():
        text_embeds = model.get_text_features(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    image_leaf = image_embeds.detach().requires_grad_(True)
    text_leaf = text_embeds.detach().requires_grad_(True)
    with part("head_forward"), precision():
        scores = model.similarity(image_leaf, text_leaf, batch["attention_mask"])
        loss = scta_loss(scores, batch["image_ids"], model.config.margin)
    with part("head_backward"):
        loss.backward()
    with part("image_tower_backward"):
        image_embeds.backward(image_leaf.grad)
    with part("text_tower_backward"):
        text_embeds.backward(text_leaf.grad)
    with part("clip_and_optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
    return seconds


def measure_train_step(job: dict) -> dict:
    """Builds the model of `job` and times its steps (runs in a fresh process unless --no-isolate)."""
    set_threads(job["threads"])
    device = torch.device(job["device"])
    torch.manual_seed(job["seed"])
    config = scta_config(job)
    model = SCTAModel(config).to(device).train()
    if "checkpointing" in job["variant"]:
        # transformers >= 5.2x names it activation_checkpointing_enable (the old name warns); older only the old
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    batch = make_batch(config, job, device)
    bf16 = "bf16" in job["variant"]

    def precision():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    for _ in range(job["warmup"]):
        plain_step(model, optimizer, batch, precision)
    seconds, losses = [], []
    with PeakMemory(device) as memory:
        for _ in range(job["steps"]):
            synchronize(device)
            start = time.perf_counter()
            losses.append(plain_step(model, optimizer, batch, precision))
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    breakdowns = [breakdown_step(model, optimizer, batch, precision, device) for _ in range(job["breakdown_steps"])]

    result = {
        "preset": job["preset"],
        "variant": job["variant"],
        "batch_size": job["batch_size"],
        "image_size": config.vision_config.image_size,
        "num_patches": config.num_patches,
        "caption_tokens_padded": batch["input_ids"].shape[1],
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "losses": losses,
        **summarize_seconds(seconds),
        **memory.as_dict(),
    }
    result["samples_per_s"] = job["batch_size"] / result["median_s"]
    if breakdowns:
        parts = {name: statistics.median(b[name] for b in breakdowns) for name in BREAKDOWN_PARTS}
        total = sum(parts.values())
        result["breakdown_s"] = parts
        result["breakdown_total_s"] = total
        result["head_share_pct"] = 100.0 * (parts["head_forward"] + parts["head_backward"]) / total
        result["towers_share_pct"] = 100.0 * sum(v for k, v in parts.items() if "tower" in k) / total
    return result


# ----------------------------------------------------------------------------------------------------------------
# Main


def parse_json_object(text: str) -> dict:
    """A JSON object given inline or as a path to a .json file."""
    source = Path(text).read_text(encoding="utf-8") if text.endswith(".json") else text
    try:
        value = json.loads(source)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r} ({error})") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--presets", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed plain steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--breakdown-steps", type=int, default=1, help="steps timed part by part (0: none)")
    parser.add_argument(
        "--vision-config", type=parse_json_object, default={}, help="JSON fields over the preset's image tower"
    )
    parser.add_argument(
        "--text-config", type=parse_json_object, default={}, help="JSON fields over the preset's text tower"
    )
    parser.add_argument(
        "--embed-size", type=int, default=None, help="default: the preset's (tiny 128 / demo's, full 512)"
    )
    parser.add_argument(
        "--captions-file",
        default=None,
        help="a one-caption-a-line file to draw caption lengths from (default: the shipped Flickr30K test histogram)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-isolate", action="store_true", help="measure in this process (memory less exact)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, batch 8, one step of each kind (seconds)")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.batch_size, args.steps, args.warmup, args.breakdown_steps = ["tiny"], 8, 1, 1, 1
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.breakdown_steps < 0:
        parser.error("--warmup and --breakdown-steps must be >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    benchlib.setup_logging()
    device = torch.device(args.device)
    set_threads(args.threads)
    lengths = draw_lengths(caption_token_counts(args.captions_file), args.batch_size, args.seed)
    results = {
        "machine": machine_info(device),
        "settings": vars(args),
        "tiny_towers_from": tiny_towers()[3],
        "runs": [],
    }
    logger.info("machine: %s", results["machine"])
    logger.info("caption tokens: mean %.1f, padded to %d", statistics.mean(lengths), max(lengths))
    for preset in args.presets:
        for variant in args.variants:
            logger.info(
                "%s / %s: %d warm-up + %d timed + %d breakdown steps at batch %d ...",
                preset,
                variant,
                args.warmup,
                args.steps,
                args.breakdown_steps,
                args.batch_size,
            )
            job = {
                "preset": preset,
                "variant": variant,
                "vision_override": args.vision_config,
                "text_override": args.text_config,
                "embed_size": args.embed_size,
                "batch_size": args.batch_size,
                "lengths": lengths,
                "steps": args.steps,
                "warmup": args.warmup,
                "breakdown_steps": args.breakdown_steps,
                "seed": args.seed,
                "device": args.device,
                "threads": args.threads,
            }
            results["runs"].append(run_isolated(measure_train_step, job, isolate=not args.no_isolate))

    rows = []
    for run in results["runs"]:
        row = dict(run)
        for name, value in run.get("breakdown_s", {}).items():
            row[name] = value
        rows.append(row)
    logger.info(
        "\n%s",
        format_table(
            rows,
            [
                ("preset", "preset", ""),
                ("variant", "variant", ""),
                ("batch", "batch_size", "d"),
                ("params M", "parameters_m", ".1f"),
                ("s/step", "median_s", ".3f"),
                ("samples/s", "samples_per_s", ".2f"),
                ("head %", "head_share_pct", ".1f"),
                ("towers %", "towers_share_pct", ".1f"),
                ("peak RSS MB", "peak_rss_mb", ".0f"),
                ("RSS growth MB", "growth_rss_mb", ".0f"),
                ("CUDA peak MB", "cuda_peak_mb", ".0f"),
            ],
        ),
    )
    if any("breakdown_s" in run for run in results["runs"]):
        logger.info(
            "\nbreakdown (seconds)\n%s",
            format_table(
                rows,
                [
                    ("preset", "preset", ""),
                    ("variant", "variant", ""),
                    *[(name.replace("_", " "), name, ".3f") for name in BREAKDOWN_PARTS],
                    ("sum", "breakdown_total_s", ".3f"),
                ],
            ),
        )
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
