"""The stage contract: what a prior, decoder or upsampler checkpoint is, and what it can be chained to.

Every stage checkpoint carries ``checkpoint["unclip"]``, the metadata dict of one typed description here:

* :class:`ClipInfo`: a CLIP's facts (embedding size, text width, context length, weights hash, image size and
  normalisation, tokenizer), from a CLIP checkpoint, export, ``unclip-embed`` folder or loaded ``FrozenCLIP``;
* :class:`PriorInfo`, :class:`DecoderInfo`, :class:`UpsamplerInfo`: the network config (a plain dict: loading
  imports no code named by a file), the ``create_diffusion`` arguments, the sampling defaults, the CLIP the stage
  was trained against, and the stage's sizes; ``build()`` the network, ``load()`` a checkpoint (EMA weights) and
  ``check(other)`` the stage it is chained to. Training (module set-up, preflight), the chain and the pipeline
  all call the same rules (:func:`clip_mismatches`, :func:`input_size_mismatch`), so each is written once.

Format versions: 0 is the untyped dict of unclip 0.1 (converted on read); :data:`FORMAT_VERSION` is written now;
a newer one is refused with a message to upgrade.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypedDict, TypeVar, overload

import torch
from torch import Tensor, nn

from unclip.checkpoints import CHECKPOINT_KEY, check_stage, read_checkpoint

FORMAT_VERSION = 1
OPEN_CLIP_CONTEXT_LENGTH = 77  # open_clip's text_cfg default, for CLIP configs that leave it out
# The stage modules' attributes (unclip.training.diffusion_stage): the EMA copy and the trained network.
EMA_PREFIX = "ema.module."
NETWORK_PREFIX = "net."
# Priors written before the diffusion-stage base held their network as "model." (their EMA keys are unchanged).
LEGACY_NETWORK_PREFIX = "model."
NETWORK_PREFIXES = (NETWORK_PREFIX, LEGACY_NETWORK_PREFIX)
# The prior's sampling defaults (§2.2: 64 strided DDIM steps, 2 candidates reranked by z_i·z_t), also the values
# format-0 prior checkpoints, which recorded none, are read with.
class PriorSampling(TypedDict):
    sampler: str
    steps: int
    guidance_scale: float
    candidates: int
    eta: float


PRIOR_SAMPLING: PriorSampling = {"sampler": "ddim", "steps": 64, "guidance_scale": 1.0, "candidates": 2, "eta": 0.0}
EQUAL, AT_LEAST = "equal to", "at least"


class ContractError(ValueError):
    """A checkpoint that cannot be read, or two stages that do not fit; the message names both sides."""


# ---- CLIP ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipInfo:
    """A CLIP's facts that later stages depend on (None: not recorded by the source).

    :param embed_dim: D of the unit-norm embeddings z_i, z_t.
    :param text_width: width W of the caption token encodings (the text transformer's).
    :param context_length: caption positions the tokenizer gives.
    :param clip_hash: sha256 of the CLIP weights (``unclip.models.clip.clip_hash``).
    :param image_size, image_mean, image_std: the image encoder's input.
    :param tokenizer: the architecture name ``make_tokenizer`` takes (None: the default tokenizer).
    """

    embed_dim: int
    text_width: int | None = None
    context_length: int | None = None
    clip_hash: str | None = None
    image_size: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    tokenizer: str | None = None

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ClipInfo:
        """From ``clip_metadata()`` (checkpoint or export), an ``unclip-embed`` meta.json or :meth:`to_dict`."""
        text_cfg = (meta.get("open_clip_config") or {}).get("text_cfg") or {}
        context = meta.get("context_length") or text_cfg.get("context_length")
        if context is None and text_cfg:
            context = OPEN_CLIP_CONTEXT_LENGTH
        width = meta.get("text_width") or text_cfg.get("width")
        size = meta.get("image_size")
        return cls(embed_dim=int(meta["embed_dim"]), text_width=None if width is None else int(width),
                   context_length=None if context is None else int(context),
                   clip_hash=None if meta.get("clip_hash") is None else str(meta["clip_hash"]),
                   image_size=None if size is None else int(size),
                   image_mean=_floats(meta.get("image_mean")), image_std=_floats(meta.get("image_std")),
                   tokenizer=meta.get("tokenizer", meta.get("arch")))

    @classmethod
    def of(cls, clip: Any) -> ClipInfo:
        """Of a loaded ``FrozenCLIP`` (its model gives the text width and context)."""
        return dataclasses.replace(cls.from_meta(clip.meta), text_width=clip.text_width,
                                   context_length=clip.context_length)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def disagreement(self, other: ClipInfo) -> tuple[str, Any, Any] | None:
        """(key, ours, theirs) of the first of embed_dim, clip_hash that two sources of one CLIP disagree on."""
        for key in ("embed_dim", "clip_hash"):
            ours, theirs = getattr(self, key), getattr(other, key)
            if None not in (ours, theirs) and ours != theirs:
                return key, ours, theirs
        return None


def _floats(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


# ---- the rules ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mismatch:
    """One broken rule: ``key=ours`` must be ``rule`` the ``their_key=theirs`` of the other side."""

    key: str
    ours: Any
    rule: str
    their_key: str
    theirs: Any

    def message(self, ours: str, theirs: str) -> str:
        """The one wording of every chaining error; ``ours``/``theirs`` name the sides ("" for a config)."""
        subject = f"{ours}: " if ours else ""
        return f"{subject}{self.key}={self.ours} must be {self.rule} the {self.their_key}={self.theirs} of {theirs}"


def clip_requirements(stage: str, model: Mapping[str, Any]) -> list[tuple[str, Any, str, str]]:
    """(model key, value, rule, CLIP field) for each size a stage's network config takes from its CLIP.

    The prior may hold more caption positions than the CLIP gives (``context_length`` at least the CLIP's).
    """
    if stage == "prior":
        return [("model.embed_dim", model.get("embed_dim"), EQUAL, "embed_dim"),
                ("model.text_width", model.get("text_width"), EQUAL, "text_width"),
                ("model.context_length", model.get("context_length"), AT_LEAST, "context_length")]
    if stage == "decoder":
        rules = [("model.clip_embed_dim", model.get("clip_embed_dim"), EQUAL, "embed_dim")]
        text = model.get("text")
        if text:
            rules += [("model.text.input_width", text.get("input_width"), EQUAL, "text_width"),
                      ("model.text.context_length", text.get("context_length"), EQUAL, "context_length")]
        return rules
    return []


def clip_mismatches(stage: str, model: Mapping[str, Any], clip: ClipInfo) -> list[Mismatch]:
    """The sizes of a stage's network config that do not fit ``clip`` (unset values on either side pass)."""
    out = []
    for key, ours, rule, their_key in clip_requirements(stage, model):
        theirs = getattr(clip, their_key)
        if ours is None or theirs is None:
            continue
        if (int(ours) < int(theirs)) if rule == AT_LEAST else (int(ours) != int(theirs)):
            out.append(Mismatch(key, ours, rule, their_key, theirs))
    return out


def hash_mismatch(recorded: str | None, clip: ClipInfo) -> Mismatch | None:
    """The stage was trained against another CLIP (both hashes known)."""
    if recorded is None or clip.clip_hash is None or str(recorded) == str(clip.clip_hash):
        return None
    return Mismatch("clip_hash", str(recorded)[:12], EQUAL, "clip_hash", str(clip.clip_hash)[:12])


def input_size_mismatch(input_size: int | None, previous_size: int | None,
                        key: str = "module.input_size") -> Mismatch | None:
    """An upsampler must take the output size of the stage before it."""
    if input_size is None or previous_size is None or int(input_size) == int(previous_size):
        return None
    return Mismatch(key, int(input_size), EQUAL, "output size", int(previous_size))


# ---- stages -------------------------------------------------------------------------------------------------------

_Info = TypeVar("_Info", bound="StageInfo")  # the class a StageInfo classmethod is called on

@dataclass
class StageInfo(abc.ABC):
    """What every diffusion stage's checkpoint records.

    :param model: the network config (plain dict, every key a constructor argument).
    :param diffusion: ``create_diffusion`` arguments of the training chain.
    :param sampling: the stage's sampling defaults (sampler, steps, ...; per-call options override them).
    :param clip: the CLIP the stage was trained against (None: the stage reads no CLIP output).
    :param training: facts about how it was trained that nothing downstream depends on (crops, masks, ...).
    :param provenance: unclip version and git commit of the writer.
    """

    stage: ClassVar[str] = ""
    model: dict
    diffusion: dict
    sampling: dict
    clip: ClipInfo | None = None
    training: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    # -- reading and writing --

    @classmethod
    def from_meta(cls: type[_Info], meta: Mapping[str, Any], source: str = "the checkpoint") -> _Info:
        """The description in ``checkpoint["unclip"]`` (any known format version; format 0 is converted).

        :raises ContractError: another stage's metadata, or a format newer than this unclip reads.
        """
        try:
            check_stage(meta.get("stage"), source, cls.stage)
        except ValueError as exc:
            raise ContractError(str(exc)) from None
        version = int(meta.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise ContractError(f"{source} has stage format {version}, newer than the {FORMAT_VERSION} this unclip "
                                f"reads: upgrade unclip to load it")
        provenance = {k: meta.get(k) for k in ("version", "git_commit")}
        try:
            if version == 0:
                return cls._from_format_0(dict(meta), provenance)
            clip = meta.get("clip")
            return cls(model=dict(meta["model_config"]), diffusion=dict(meta["diffusion"]),
                       sampling=dict(meta["sampling"]), clip=None if clip is None else ClipInfo.from_meta(clip),
                       training=dict(meta.get("training") or {}), provenance=provenance, **cls._stage_fields(meta))
        except KeyError as exc:
            raise ContractError(f"{source}: the {cls.stage} stage metadata (format {version}) lacks {exc}") from None

    @classmethod
    @abc.abstractmethod
    def _from_format_0(cls: type[_Info], meta: dict, provenance: dict) -> _Info:
        """The description of a format-0 (untyped unclip 0.1) metadata dict; each stage converts its own."""

    @classmethod
    def _stage_fields(cls, meta: Mapping[str, Any]) -> dict:
        return {}

    def to_meta(self) -> dict[str, Any]:
        """``checkpoint["unclip"]`` of this description (plain containers only)."""
        meta = {"stage": self.stage, "format_version": FORMAT_VERSION, **self.provenance,
                "model_config": dict(self.model), "diffusion": dict(self.diffusion), "sampling": dict(self.sampling),
                "clip": None if self.clip is None else self.clip.to_dict(), "training": dict(self.training)}
        meta.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name not in StageInfo.__dataclass_fields__})
        return meta

    @classmethod
    def read(cls: type[_Info], path: str | Path) -> _Info:
        """The description of the checkpoint at ``path`` (metadata only; the weights are read but not built)."""
        return cls.from_checkpoint(read_checkpoint(path), str(path))

    @classmethod
    def from_checkpoint(cls: type[_Info], checkpoint: Mapping[str, Any], source: str) -> _Info:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(meta, Mapping) or "stage" not in meta:
            raise ContractError(f"{source} is not an unclip checkpoint (no checkpoint['{CHECKPOINT_KEY}']['stage'])")
        return cls.from_meta(meta, source)

    # -- the network --

    @abc.abstractmethod
    def build(self) -> nn.Module:
        """The stage's network, randomly initialised, on the current default device."""

    @classmethod
    def load(cls: type[_Info], path: str | Path,
             device: str | torch.device = "cpu") -> tuple[nn.Module, _Info]:
        """(network with the checkpoint's EMA weights, or its training weights without an EMA copy, in eval mode
        and frozen, on ``device``; its description). Never unpickles code (``read_checkpoint``)."""
        checkpoint = read_checkpoint(path)
        info = cls.from_checkpoint(checkpoint, str(path))
        weights, _ = network_weights(checkpoint.get("state_dict") or {}, str(path))
        with torch.device("meta"):  # no allocation or initialisation for weights about to be replaced
            net = info.build()
        net.load_state_dict(weights, assign=True)
        return net.to(device).eval().requires_grad_(False), info

    # -- sizes shared by the chain --

    @property
    def image_size(self) -> int:
        return int(self.model["image_size"])

    def clip_mismatches(self, clip: ClipInfo) -> list[Mismatch]:
        """Sizes and weights hash that do not fit ``clip``."""
        found = clip_mismatches(self.stage, self.model, clip)
        recorded = None if self.clip is None else self.clip.clip_hash
        mismatch = hash_mismatch(recorded, clip)
        return found + ([mismatch] if mismatch else [])


def upgrade_module_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A stage module's state dict with the legacy network prefix renamed (``model.*`` → ``net.*``), so that a
    checkpoint of an older prior resumes into today's module; other keys (``ema.*``) pass unchanged."""
    if any(k.startswith(NETWORK_PREFIX) for k in state_dict):
        return dict(state_dict)
    return {NETWORK_PREFIX + k[len(LEGACY_NETWORK_PREFIX):] if k.startswith(LEGACY_NETWORK_PREFIX) else k: v
            for k, v in state_dict.items()}


def network_weights(state_dict: Mapping[str, Tensor], source: str = "the checkpoint") -> tuple[dict[str, Tensor], str]:
    """(the network's weights, "ema.module" | "net" | "model") of a stage module's state dict: the EMA copy when
    present. The one place that knows the LightningModules' attribute names.

    :raises ContractError: when no network weights are found.
    """
    for prefix in (EMA_PREFIX, *NETWORK_PREFIXES):
        weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if weights:
            return weights, prefix.rstrip(".")
    raise ContractError(f"{source} holds no network weights (no '{EMA_PREFIX}*', '{NETWORK_PREFIX}*' or "
                        f"'{LEGACY_NETWORK_PREFIX}*' keys)")


@dataclass
class PriorInfo(StageInfo):
    """A diffusion prior p(z_i | y): ``model`` is a ``conf/model/prior`` dict with its CLIP sizes filled in."""

    stage: ClassVar[str] = "prior"

    @classmethod
    def _from_format_0(cls, meta: dict, provenance: dict) -> PriorInfo:
        model = dict(meta["model_config"])
        clip = ClipInfo(embed_dim=int(meta["embed_dim"] if "embed_dim" in meta else model["embed_dim"]),
                        text_width=int(meta["text_width"] if "text_width" in meta else model["text_width"]),
                        context_length=meta.get("clip_context_length"), clip_hash=meta.get("clip_hash"))
        return cls(model=model, diffusion=dict(meta["diffusion"]), sampling=dict(PRIOR_SAMPLING), clip=clip,
                   provenance=provenance)

    @property
    def embed_dim(self) -> int:
        return int(self.model["embed_dim"])

    @property
    def embed_scale(self) -> float:
        """The factor embeddings enter the diffusion with (§2.2: 17.2)."""
        from unclip.models.prior import resolve_embed_scale

        return resolve_embed_scale(self.model["embed_scale"], self.embed_dim)

    def build(self) -> nn.Module:
        from unclip.models.prior import PriorTransformer

        return PriorTransformer.from_config(self.model)

    def check(self, clip: ClipInfo, ours: str = "the prior", theirs: str = "the CLIP") -> None:
        """Refuse a CLIP this prior was not trained against (sizes, weights hash), naming both sides."""
        _raise_first(self.clip_mismatches(clip), ours, theirs, self.clip)


@dataclass
class DecoderInfo(StageInfo):
    """The base decoder p(x | z_i, y) (``model.inpaint``: an inpainting decoder, 4 extra input channels)."""

    stage: ClassVar[str] = "decoder"

    @classmethod
    def _from_format_0(cls, meta: dict, provenance: dict) -> DecoderInfo:
        # checkpoints from before inpainting decoders existed have no model.inpaint key
        model = {**meta["model_config"], "inpaint": bool(meta["model_config"].get("inpaint", False))}
        text = model.get("text")
        clip = ClipInfo(embed_dim=int(meta.get("embed_dim", model["clip_embed_dim"])),
                        text_width=text["input_width"] if text else None,
                        context_length=text["context_length"] if text else None, clip_hash=meta.get("clip_hash"))
        training = {k: meta[k] for k in ("init_from", "masks") if k in meta}
        return cls(model=model, diffusion=dict(meta["diffusion"]), sampling=dict(meta["sampling"]), clip=clip,
                   training=training, provenance=provenance)

    @property
    def embed_dim(self) -> int:
        return int(self.model["clip_embed_dim"])

    @property
    def text_conditioning(self) -> bool:
        return self.model.get("text") is not None

    @property
    def inpaint(self) -> bool:
        return bool(self.model.get("inpaint", False))

    def build(self) -> nn.Module:
        from unclip.models.unet import DecoderUNet, build_unet

        return build_unet(DecoderUNet, self.model, out_channels_for(self.diffusion, self.model["in_channels"]))

    def check(self, clip: ClipInfo, ours: str = "the decoder", theirs: str = "the CLIP") -> None:
        """Refuse a CLIP this decoder was not trained against (sizes, weights hash), naming both sides."""
        _raise_first(self.clip_mismatches(clip), ours, theirs, self.clip)


@dataclass
class UpsamplerInfo(StageInfo):
    """One super-resolution step: ``input_size`` → ``image_size`` (fully convolutional: any multiple of it).

    ``residual``: the network denoises the residual target − upsampled input (SRDiff, Li et al. 2022) and samples
    are the upsampled input plus the sampled residual; False for checkpoints that do not record it.
    """

    stage: ClassVar[str] = "upsampler"
    input_size: int = 0
    residual: bool = False

    @classmethod
    def _from_format_0(cls, meta: dict, provenance: dict) -> UpsamplerInfo:
        training = {k: meta[k] for k in ("crop_size", "degradation") if k in meta}
        return cls(model=dict(meta["model_config"]), diffusion=dict(meta["diffusion"]),
                   sampling=dict(meta["sampling"]), training=training, provenance=provenance,
                   input_size=int(meta["input_size"]))

    @classmethod
    def _stage_fields(cls, meta: Mapping[str, Any]) -> dict:
        return {"input_size": int(meta["input_size"]), "residual": bool(meta.get("residual", False))}

    def build(self) -> nn.Module:
        from unclip.models.unet import SuperResUNet, build_unet

        return build_unet(SuperResUNet, self.model, out_channels_for(self.diffusion, self.model["in_channels"]))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output size for a height×width input: the trained scale factor applied."""
        scale = self.image_size / self.input_size
        return round(height * scale), round(width * scale)

    def check(self, previous: DecoderInfo | UpsamplerInfo, ours: str = "the upsampler",
              theirs: str = "the stage before it") -> None:
        """Refuse a previous stage whose output size is not this upsampler's input size, naming both sides."""
        mismatch = input_size_mismatch(self.input_size, previous.image_size, key="input_size")
        if mismatch is not None:
            raise ContractError(mismatch.message(ours, theirs))


def _raise_first(found: list[Mismatch], ours: str, theirs: str, recorded: ClipInfo | None) -> None:
    if recorded is None or recorded.clip_hash is None:
        raise ContractError(f"{ours} does not record which CLIP it was trained against (no clip_hash); it cannot be "
                            f"checked against {theirs}")
    if found:
        raise ContractError(found[0].message(ours, theirs))


STAGES: dict[str, type[StageInfo]] = {cls.stage: cls for cls in (PriorInfo, DecoderInfo, UpsamplerInfo)}


@overload
def stage_info(meta: Mapping[str, Any] | StageInfo, stage: Literal["prior"]) -> PriorInfo: ...
@overload
def stage_info(meta: Mapping[str, Any] | StageInfo, stage: Literal["decoder"]) -> DecoderInfo: ...
@overload
def stage_info(meta: Mapping[str, Any] | StageInfo, stage: Literal["upsampler"]) -> UpsamplerInfo: ...
@overload
def stage_info(meta: Mapping[str, Any] | StageInfo, stage: str | None = None) -> StageInfo: ...
def stage_info(meta: Mapping[str, Any] | StageInfo, stage: str | None = None) -> StageInfo:
    """A description from itself or from a metadata dict (``stage``: the expected stage, default the dict's)."""
    if isinstance(meta, StageInfo):
        if stage is not None and meta.stage != stage:
            raise ContractError(f"a '{meta.stage}' stage description where a '{stage}' one is needed")
        return meta
    name = stage or meta.get("stage")
    if name not in STAGES:
        raise ContractError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")
    return STAGES[name].from_meta(meta)


def read_stage(path: str | Path, stage: str) -> StageInfo:
    """The description of the ``stage`` checkpoint at ``path``; another stage's checkpoint is refused naming both."""
    if stage not in STAGES:
        raise ContractError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    return STAGES[stage].read(path)


def out_channels_for(diffusion: Mapping[str, Any], in_channels: int) -> int:
    """Network output channels: the prediction, plus variance logits when the process learns its variance."""
    from unclip.diffusion import ModelVarType, create_diffusion

    learned = create_diffusion(**diffusion).var_type == ModelVarType.LEARNED_RANGE
    return in_channels * (2 if learned else 1)
