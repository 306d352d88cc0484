"""Every shell command in README.md's ```bash blocks, and what the README tests do with each (issue 20).

:data:`COMMANDS` classifies every command by its exact README text: :class:`Run` (run in order by the slow test,
with placeholders replaced by files earlier commands made and tiny-size overrides appended) or :class:`Skip` with
the reason (GPU, cluster, internet, multi-node). A README command missing from the table, or a table entry no
longer in the README, fails the fast test: a changed command is looked at again.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HYDRA_PROGRAMS = {"unclip-train": "train", "unclip-eval": "evaluate", "unclip-sample": "sample",
                  "unclip-embed": "embed"}
MODULES = {"unclip-train": "unclip.train", "unclip-eval": "unclip.evaluate", "unclip-sample": "unclip.sample",
           "unclip-embed": "unclip.embed", "unclip-export": "unclip.export", "unclip-shards": "unclip.data.make_shards",
           "unclip-data-check": "unclip.data.inspect"}


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, at the start or after a space)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of README.md's ```bash blocks, in order: continuations joined, comments and blank lines dropped."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = _strip_comment(line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


@dataclass(frozen=True)
class Skip:
    reason: str
    compose: bool = True  # a Hydra program's overrides still compose (placeholders replaced)


@dataclass(frozen=True)
class Run:
    """:param replace: (README text, stand-in) pairs applied to the command's text first.
    :param append: arguments appended (tiny sizes, few steps).
    :param creates: files (relative to the run folder) that must exist afterwards.
    """

    replace: tuple[tuple[str, str], ...] = ()
    append: tuple[str, ...] = ()
    creates: tuple[str, ...] = ()
    setup: str | None = None  # a name in the slow test's SETUPS, run before the command

    def command(self, readme: str) -> str:
        for old, new in self.replace:
            assert old in readme, f"{old!r} not in {readme!r}"
            readme = readme.replace(old, new)
        return " ".join([readme, *map(shlex.quote, self.append)])


# Tiny sizes and stand-ins, shared by the commands below.
CLIP = "runs/clip/checkpoints/last.ckpt"
PRIOR = "runs/prior/checkpoints/last.ckpt"
DECODER = "runs/decoder/checkpoints/last.ckpt"
UPSAMPLER = "runs/upsampler/checkpoints/last.ckpt"
QUICK = ("logger=none", "cpu_threads=1", "data.num_workers=0", "data.shuffle_buffer=16", "trainer.max_steps=2",
         "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "trainer.limit_val_batches=0",
         "data.batch_size=4", "data.batches_per_epoch=2", "module.scheduler.warmup_steps=1")
# The text width stays the tiny CLIP's 128: the later presets' text widths are checked against it.
TINY_CLIP = ("model.vision.width=32", "model.vision.layers=1", "model.vision.head_width=16", "model.text.layers=1")
TINY_PRIOR = ("model.width=32", "model.depth=1", "model.heads=2", "module.val_sampling.steps=2",
              "module.val_sampling.candidates=1")
TINY_DECODER = ("model.image_size=16", "model.model_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
                "model.attention_resolutions=[8]", "model.num_head_channels=8", "model.num_groups=8",
                "model.context_width=32", "model.text.heads=2", "module.sampling.steps=2")
TINY_UPSAMPLER = ("model.image_size=32", "module.input_size=16", "model.model_channels=16", "model.channel_mult=[1,2]",
                  "model.num_res_blocks=1", "model.num_groups=8", "module.sampling.steps=2")
CHAIN = f"clip_ckpt={CLIP} prior_ckpt={PRIOR} decoder_ckpt={DECODER}"
FEW_STEPS = ("prior.steps=2", "prior.candidates=1", "decoder.steps=2", "upsamplers.steps=2", "device=cpu")
SHARDS = "shards/{00000..00009}.tar"
EVAL = ("num_samples=4", "batch_size=4", "grid_size=4", "kid.subsets=2", "cache_dir=null")

COMMANDS: dict[str, Run | Skip] = {
    # ---- install and tests
    "pip install -e . && unclip-demo": Skip("installs the package (pip) and runs the whole demo: tests/test_demo.py "
                                            "runs the demo at test size", compose=False),
    "pip install -e '.[dev]' && pytest": Skip("installs and runs this very suite", compose=False),
    "pip wheel --no-deps -w dist . && pip install dist/unclip-*.whl && cd /tmp && unclip-train --help":
        Skip("builds and installs a wheel: tests/test_wheel.py does it", compose=False),
    # ---- data
    "unclip-shards photos/ --out shards/ --samples-per-shard 1000 --resize center_crop --image-size 256":
        Run(append=("--samples-per-shard", "4", "--image-size", "64"), creates=("shards/00009.tar",),
            setup="photos"),
    "unclip-shards captions.parquet --image-column path --caption-column caption --out shards/":
        Run(replace=(("--out shards/", "--out shards_parquet/"),), append=("--image-size", "64"),
            creates=("shards_parquet/00000.tar",), setup="parquet"),
    "unclip-shards 'old/{00000..00099}.tar' --out resharded/ --resize max_side --image-size 512":
        Run(replace=(("old/{00000..00099}.tar", SHARDS),), append=("--image-size", "32"),
            creates=("resharded/00000.tar",)),
    "unclip-data-check 'shards/{00000..00009}.tar' --image-size 64 --num-workers 2":
        Run(append=("--num-workers", "0")),
    # ---- training
    "unclip-train experiment=emoji_clip_tiny": Run(append=("run_dir=runs/clip", *QUICK, *TINY_CLIP), creates=(CLIP,)),
    "unclip-train stage=clip data=webdataset \"data.train_shards='/data/{00000..00999}.tar'\" trainer=gpu "
    "model/clip=vit_b32": Skip("trainer=gpu: needs a GPU (a ViT-B/32 at 224px)"),
    "unclip-train experiment=demo_clip_tiny data.hard_negatives=3":
        Skip("trains on the demo data set, generated on first use (minutes on 2 cores); unclip-demo and "
             "tests/training/test_clip_train.py train with hard negatives at test size"),
    "unclip-embed clip_ckpt=runs/clip/checkpoints/last.ckpt \"shards='/data/{00000..00999}.tar'\" out_dir=emb/train":
        Run(replace=(("/data/{00000..00999}.tar", SHARDS),),
            append=("batch_size=8", "num_workers=0", "device=cpu", "progress=false"), creates=("emb/train",)),
    "unclip-train experiment=emoji_prior_tiny clip_ckpt=runs/clip/checkpoints/last.ckpt":
        Run(append=("run_dir=runs/prior", *QUICK, *TINY_PRIOR), creates=(PRIOR,)),
    "unclip-train experiment=emoji_decoder_tiny clip_ckpt=runs/clip/checkpoints/last.ckpt":
        Run(append=("run_dir=runs/decoder", *QUICK, *TINY_DECODER), creates=(DECODER,)),
    "unclip-train experiment=emoji_upsampler_tiny":
        Run(append=(f"decoder_ckpt={DECODER}", "run_dir=runs/upsampler", *QUICK, *TINY_UPSAMPLER),
            creates=(UPSAMPLER,)),
    "unclip-train experiment=paper_decoder trainer=ddp trainer.devices=8 data.batches_per_epoch=5000 ...":
        Skip("8 GPUs (trainer=ddp, devices=8)"),
    "unclip-train experiment=paper_decoder dry_run=true": Run(),
    "unclip-train experiment=emoji_prior_tiny run_dir=runs/p logger=[csv,wandb] 'logger.wandb.tags=[prior,baseline]'":
        Skip("logs to a W&B server (internet and an account)"),
    "unclip-train experiment=emoji_prior_tiny run_dir=runs/p logger=[csv,wandb] resume=true trainer.max_steps=4000":
        Skip("logs to a W&B server (internet and an account)"),
    "wandb sync runs/p/wandb/offline-run-*": Skip("uploads to a W&B server (internet)", compose=False),
    # ---- sampling and evaluation
    "unclip-sample clip_ckpt=... prior_ckpt=... decoder_ckpt=... 'upsampler_ckpts=[...]' 'prompts=[\"a red star\"]'":
        Run(replace=(("clip_ckpt=... prior_ckpt=... decoder_ckpt=...", CHAIN), ("[...]", f"[{UPSAMPLER}]")),
            append=("num_images=4", "out_dir=samples/baseline", *FEW_STEPS),  # > k=3 images for P/R below
            creates=("samples/baseline/grid.png", "samples/baseline/samples.json")),
    "unclip-sample ... mode=variations image=photo.png":
        Run(replace=(("...", CHAIN),), append=("num_images=1", "out_dir=samples/variations", *FEW_STEPS),
            creates=("samples/variations/grid.png",), setup="photo"),
    "unclip-eval clip_ckpt=... prior_ckpt=... decoder_ckpt=... \"val_shards='val/{00000..00009}.tar'\" "
    "num_samples=10000 inception_weights=pt_inception-2015-12-05.pth clip_scorer=other_clip_export/":
        Run(replace=(("clip_ckpt=... prior_ckpt=... decoder_ckpt=...", CHAIN), ("val/{00000..00009}.tar", SHARDS),
                     ("other_clip_export/", CLIP)),
            append=(*EVAL, "out_dir=runs/eval/main", *FEW_STEPS), creates=("runs/eval/main/report.json",),
            setup="inception"),
    "unclip-eval --config-name evaluate_edit ...":
        Skip("needs an inpainting decoder (trained in the last command of this block); "
             "tests/evaluation/test_evaluate_edit.py runs it at test size"),
    "unclip-eval -m clip_ckpt=... prior_ckpt=... decoder_ckpt=... \"val_shards='val/{00000..00009}.tar'\" "
    "out_dir=runs/eval/guidance 'decoder.guidance_scale=1,2,4'":
        Run(replace=(("clip_ckpt=... prior_ckpt=... decoder_ckpt=...", CHAIN), ("val/{00000..00009}.tar", SHARDS),
                     ("1,2,4", "1,2")),
            append=(*EVAL, "feature_extractor=clip", *FEW_STEPS),
            creates=("runs/eval/guidance/0/report.json", "runs/eval/guidance/1/report.json")),
    "python scripts/collect_runs.py runs/eval/guidance --csv runs/eval/guidance/table.csv":
        Run(creates=("runs/eval/guidance/table.csv",)),
    "unclip-train experiment=emoji_inpaint_decoder_tiny module.init_from=runs/decoder/checkpoints/last.ckpt "
    "clip_ckpt=...": Run(replace=(("clip_ckpt=...", f"clip_ckpt={CLIP}"),),
                         append=("run_dir=runs/inpaint", *QUICK, *TINY_DECODER),
                         creates=("runs/inpaint/checkpoints/last.ckpt",)),
    # ---- pretrained CLIPs, export, scoring
    "huggingface-cli download timm/vit_large_patch14_clip_224.openai --local-dir /models/vit_l14_openai":
        Skip("downloads from the Hugging Face hub (internet)", compose=False),
    "unclip-embed clip_ckpt=/models/vit_l14_openai \"shards='/data/{00000..00999}.tar'\" out_dir=emb/l14":
        Skip("needs the downloaded ViT-L/14 (internet) and a GPU for its size"),
    "unclip-train experiment=paper_prior clip=openai_vit_l14 clip_ckpt=/models/vit_l14_openai "
    "data.embeddings=emb/l14 ...": Skip("paper-size prior on a downloaded ViT-L/14: GPU and internet"),
    "unclip-train experiment=paper_decoder clip=openai_vit_l14 clip_ckpt=/models/vit_l14_openai ...":
        Skip("paper-size decoder on a downloaded ViT-L/14: GPU and internet"),
    "unclip-train experiment=paper_decoder clip=openai_vit_l14 dry_run=true": Run(),
    "unclip-export runs/prior/checkpoints/last.ckpt exports/prior --dtype bf16":
        Run(creates=("exports/prior/config.json",)),
    "unclip-export --chain exports/unclip-l14 --clip /models/vit_l14_openai --prior runs/prior/checkpoints/last.ckpt "
    "--decoder runs/decoder/checkpoints/last.ckpt":
        Run(replace=(("/models/vit_l14_openai", CLIP),), creates=("exports/unclip-l14/pipeline.json",)),
    "unclip-eval --config-name evaluate_score \"real='/data/coco_val/{00000..00029}.tar'\" num_real=30000 "
    "image_size=256 save_reference=stats/coco30k_256.npz fake=null out_dir=runs/score/ref":
        Run(replace=(("/data/coco_val/{00000..00029}.tar", SHARDS),),
            append=("num_real=16", "image_size=32", "batch_size=8", "device=cpu", "inception_weights=inception.pth"),
            creates=("stats/coco30k_256.npz", "runs/score/ref/report.json"), setup="inception"),
    "unclip-eval --config-name evaluate_score fake=samples/baseline real=stats/coco30k_256.npz image_size=256 "
    "out_dir=runs/score/baseline":
        Run(append=("image_size=32", "batch_size=8", "device=cpu", "inception_weights=inception.pth",
                    "kid.subsets=2"), creates=("runs/score/baseline/report.json",)),
    # ---- scale-out
    "unclip-train experiment=paper_decoder trainer=ddp trainer.devices=8 trainer.num_nodes=16 "
    "data.batches_per_epoch=5000": Skip("16 nodes of 8 GPUs"),
    "unclip-train experiment=paper_prior trainer=fsdp trainer.devices=8":
        Skip("8 GPUs; tests/scaleout/test_distributed.py runs FSDP on 2 CPU ranks"),
    "unclip-train -m hydra/launcher=slurm experiment=paper_decoder resume=auto ...":
        Skip("submits to a SLURM cluster (submitit launcher plugin)", compose=False),
    "unclip-train -m +sweep=decoder_clip_tokens experiment=emoji_decoder_tiny ...":
        Skip("a sweep of emoji decoder trainings (minutes each); tests/scaleout/test_sweep.py runs sweeps tiny"),
    "python scripts/collect_runs.py multirun/decoder/<date>":
        Skip("reads a finished sweep's folder; the collect_runs command above runs on the guidance sweep",
             compose=False),
}


def hydra_overrides(command: str) -> tuple[str, str, list[str]] | None:
    """``(program, config name, overrides)`` of a Hydra program's command with every placeholder replaced (``...``
    arguments dropped, ``=...`` values and ``[...]`` lists given a stand-in path, a sweep's values its first); None
    for other programs."""
    words = shlex.split(command)
    if not words or words[0] not in HYDRA_PROGRAMS:
        return None
    program, config, overrides = words[0], HYDRA_PROGRAMS[words[0]], []
    args = iter(words[1:])
    multirun = False
    for arg in args:
        if arg == "--config-name":
            config = next(args)
        elif arg == "-m":
            multirun = True
        elif arg == "...":
            continue
        else:
            key, _, value = arg.partition("=")
            value = value.replace("[...]", "[placeholder.ckpt]")
            value = "placeholder.ckpt" if value == "..." else value
            if multirun and "," in value and not value.startswith(("[", "'", '"')):
                value = value.split(",")[0]
            overrides.append(f"{key}={value}")
    return program, config, overrides


@dataclass
class Classified:
    missing: list[str] = field(default_factory=list)  # in the README, not in COMMANDS
    stale: list[str] = field(default_factory=list)  # in COMMANDS, no longer in the README


def classify(commands: list[str]) -> Classified:
    return Classified([c for c in commands if c not in COMMANDS], [c for c in COMMANDS if c not in commands])
