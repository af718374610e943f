"""A small image encoder pretrained in-project: the papers' first step (an image model) on this machine.

    python benchmarks/image_pretrain.py [--data runs/ablation/data32] [--out runs/ablation/data32_vit] [--steps 400]

A `transformers` ViT (`ViTModel`, 4 layers, 64 wide, 2 heads, patch 8 at 32x32: the width, heads and
patch of the ablation's first stage) learns on single frames of the synthetic corpus with an image-text
contrastive loss: one random frame of each clip against that clip's sentence (the event it shows), the
sentence encoded by the project's text encoder (`HierarchicalTextEncoder`, the packaged MiniLM, as the
ablation trains it). The image feature is what the video encoder pools: the mean of the patch tokens
after the final norm, so the features a video run starts from are the ones this loss shaped. The loss
is `pretrain.losses.vpc_loss` over the B*M frame-sentence pairs of a batch (in-batch negatives).

The folder is what `save_pretrained` writes (config.json, model.safetensors) plus
preprocessor_config.json (the pixel mean and std the frames were normalised with) and
image_pretrain.json (the settings, the final loss, held-out frame-to-sentence R@1 and the wall time):
`model.video.init_image: FOLDER` takes it as any ViT. `ensure_image_encoder` trains once and reuses a
finished folder whose settings and corpus match.

Letters: B videos, M clips = sentences, T frames, P = B*M frame-sentence pairs, E embedding width.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DONE = "image_pretrain.json"  # written last: a folder with it is finished


@dataclass
class ImagePretrainConfig:
    width: int = 64  # ViT hidden size = the ablation's first-stage width (model.video.dims[0])
    layers: int = 4  # ViT blocks: enough for every stage of a 4-stage encoder
    heads: int = 2  # = model.video.heads[0]
    patch_size: int = 8  # = model.video.patch_size
    image_size: int = 32  # = data.size of the ablation's corpus
    embed_dim: int = 128  # the contrastive space (the projection heads are not saved)
    steps: int = 400
    batch_size: int = 8  # videos per step: B*M = 32 frame-sentence pairs
    lr: float = 1e-3  # ViT and heads
    text_lr: float = 5e-5  # the pretrained text encoder, as the ablation
    warmup_steps: int = 30
    temperature: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"bad value for width: expected a multiple of heads = {self.heads} (got {self.width})")
        if self.image_size % self.patch_size:
            raise ValueError(f"bad value for image_size: expected a multiple of patch_size = {self.patch_size}")


def vit_config(cfg: ImagePretrainConfig):
    from transformers import ViTConfig

    return ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=4 * cfg.width,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # google/vit's, and the video encoder's default


def normalise(frames):
    """uint8 (..., 3, H, W) -> float, (x / 255 - mean) / std, as the video encoder does."""
    import torch

    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (frames.float() / 255 - mean) / std


class ImageText:
    """The ViT, the text encoder and two projection heads: frame and sentence embeddings."""

    def __init__(self, cfg: ImagePretrainConfig, text_cfg):
        import torch.nn as nn
        from transformers import ViTModel

        from pretrain.text_encoder import HierarchicalTextEncoder

        self.vit = ViTModel(vit_config(cfg), add_pooling_layer=False)
        self.text = HierarchicalTextEncoder(text_cfg)
        self.image_head = nn.Linear(cfg.width, cfg.embed_dim)
        self.text_head = nn.Linear(self.text.dim, cfg.embed_dim)
        self.modules = nn.ModuleDict(dict(vit=self.vit, text=self.text, image_head=self.image_head,
                                          text_head=self.text_head))

    def embed_images(self, images):
        """(P, 3, H, W) normalised -> (P, E): the mean of the patch tokens after the final norm, projected."""
        import torch.nn.functional as F

        tokens = self.vit(pixel_values=images).last_hidden_state  # (P, 1+N, D), final norm applied
        return F.normalize(self.image_head(tokens[:, 1:].mean(1)), dim=-1)

    def embed_sentences(self, input_ids, attention_mask):
        """(B, M, L) -> (B*M, E)."""
        import torch.nn.functional as F

        sentences, _ = self.text(input_ids, attention_mask)  # (B, M, Dt)
        return F.normalize(self.text_head(sentences.flatten(0, 1)), dim=-1)


def pick_frames(video, M: int, generator=None):
    """(B, T, 3, H, W) -> (B*M, 3, H, W): one frame of each of the M clips, at random (None: the middle one)."""
    import torch

    B, T = video.shape[:2]
    F_ = T // M  # frames per clip
    if generator is None:
        offset = torch.full((B, M), F_ // 2)
    else:
        offset = torch.randint(F_, (B, M), generator=generator)
    index = torch.arange(M) * F_ + offset  # (B, M)
    return video[torch.arange(B)[:, None], index].flatten(0, 1)  # (B*M, 3, H, W)


def data_config(corpus: Path, cfg: ImagePretrainConfig):
    """The ablation's data and text settings on `corpus` (benchmarks/configs/ablation.yaml)."""
    from pretrain.config import load_config

    run = load_config(REPO / "benchmarks/configs/ablation.yaml",
                      [f"data.train_shards={corpus}/train", f"data.val_shards={corpus}/val", f"data.seed={cfg.seed}",
                       f"data.batch_size={cfg.batch_size}", f"data.size={cfg.image_size}"])
    return run.data, run.model.text


def held_out_r1(model: ImageText, data, text_path: str) -> tuple[float, int]:
    """Frame-to-sentence R@1 (%) over the held-out split: the middle frame of each clip against every
    clip's sentence (chance 100 / number of sentences)), and the number of pairs."""
    import torch

    from pretrain.config import REPO_ROOT
    from shards.loader import build_eval_loader

    images, texts = [], []
    with torch.no_grad():
        for batch in build_eval_loader(data, text_path, 0, 1, root=str(REPO_ROOT)):
            M = batch["input_ids"].shape[1]
            images.append(model.embed_images(normalise(pick_frames(batch["video"], M))))
            texts.append(model.embed_sentences(batch["input_ids"], batch["attention_mask"]))
    sim = torch.cat(images) @ torch.cat(texts).t()  # (P, P)
    return 100.0 * float((sim.argmax(1) == torch.arange(sim.shape[0])).float().mean()), sim.shape[0]


def pretrain_image_encoder(corpus: Path, out: Path, cfg: ImagePretrainConfig) -> dict:
    """Train the ViT on `corpus`/train, save it to `out`; -> the record written to out/image_pretrain.json."""
    import torch

    from pretrain.config import REPO_ROOT, TrainConfig
    from pretrain.losses import vpc_loss
    from pretrain.trainer import build_scheduler, param_groups
    from shards.loader import build_train_loader

    t0 = time.perf_counter()
    data, text_cfg = data_config(corpus, cfg)
    torch.manual_seed(cfg.seed)
    model = ImageText(cfg, text_cfg)
    net = model.modules
    net.train()
    params = param_groups(net, lambda name: cfg.text_lr if name.startswith("text.") else cfg.lr, 0.05)
    optimizer = torch.optim.AdamW(params, betas=(0.9, 0.98), eps=1e-8)
    scheduler = build_scheduler(optimizer, TrainConfig(steps=cfg.steps, warmup_steps=cfg.warmup_steps))
    loader = build_train_loader(data, text_cfg.resolved_path(), 0, 1, root=str(REPO_ROOT))
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    try:
        it = iter(loader)
        for step in range(cfg.steps):
            batch = next(it)
            M = batch["input_ids"].shape[1]
            images = model.embed_images(normalise(pick_frames(batch["video"], M, generator)))  # (P, E)
            texts = model.embed_sentences(batch["input_ids"], batch["attention_mask"])  # (P, E)
            loss = vpc_loss(images, texts, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
                print(f"image pretraining step {step + 1}/{cfg.steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}",
                      flush=True)
    finally:
        loader.close()
    net.eval()
    r1, pairs = held_out_r1(model, data, text_cfg.resolved_path())
    out.mkdir(parents=True, exist_ok=True)
    model.vit.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": MEAN, "image_std": STD,
        "size": {"height": cfg.image_size, "width": cfg.image_size}}, indent=1) + "\n")
    record = {"settings": dataclasses.asdict(cfg), "corpus": str(corpus),
              "loss_first_50": sum(losses[:50]) / len(losses[:50]), "loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
              "held_out_frame_to_sentence_R1": r1, "held_out_pairs": pairs, "chance_R1": 100.0 / pairs,
              "wall_seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}
    (out / DONE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def ensure_image_encoder(corpus: str | Path, out: str | Path, cfg: ImagePretrainConfig | None = None) -> Path:
    """`out`, holding the image encoder pretrained on `corpus` with `cfg`: reused when out/image_pretrain.json
    says it was trained with the same settings on the same corpus, else (re)trained."""
    corpus, out, cfg = Path(corpus).resolve(), Path(out).resolve(), cfg or ImagePretrainConfig()
    done = out / DONE
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("settings") == dataclasses.asdict(cfg) and record.get("corpus") == str(corpus):
            return out
        print(f"{out}: trained with other settings or on another corpus; training again", flush=True)
        done.unlink()
    pretrain_image_encoder(corpus, out, cfg)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO / "runs/ablation/data32"), help="corpus folder (train/ and val/)")
    p.add_argument("--out", default=str(REPO / "runs/ablation/data32_vit"),
                   help="the folder to write (the one benchmarks/ablation.py uses for runs/ablation/data32)")
    p.add_argument("--steps", type=int, default=ImagePretrainConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    out = ensure_image_encoder(args.data, args.out, ImagePretrainConfig(steps=args.steps, seed=args.seed))
    print(json.dumps(json.loads((out / DONE).read_text()), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
