"""UnCLIPPipeline: a validated chain of checkpoints turned into images (Ramesh et al. 2022 §2 and §3).

    pipe = UnCLIPPipeline.from_checkpoints(clip="runs/demo/clip/checkpoints/last.ckpt",
                                           prior="runs/demo/prior/checkpoints/last.ckpt",
                                           decoder="runs/demo/decoder/checkpoints/last.ckpt",
                                           upsamplers=["runs/demo/upsampler/checkpoints/last.ckpt"])
    images = pipe(["a small red circle on a blue background"], num_images_per_prompt=4, seed=0).images
    variations = pipe.variations(images[0], num_variations=4, eta=1.0, seed=1).images
    frames = pipe.interpolate(image_a, image_b, n=5).images
    edited = pipe.text_diff(image, "a red circle", "a red square", thetas=[0, 0.25, 0.5]).images

Text → image: caption → (z_t, caption tokens) by CLIP → z_i by the prior (N candidates, reranked by z_i·z_t) →
base image by the decoder (guided by z_i and the caption) → each upsampler. The image modes encode an image into
the bipartite latent (z_i, x_T) of §3.1: z_i from CLIP's image encoder, x_T by DDIM inversion of the decoder.
Per-stage knobs are dicts (None keeps the checkpoint's own sampling config):

* ``prior``: sampler, steps, guidance_scale, candidates, eta;
* ``decoder``: sampler, steps, spacing, guidance_scale, eta;
* ``upsamplers``: one dict for every upsampler or a list with one per upsampler: sampler, steps, spacing, eta,
  noise_aug_level.

``embedding="caption"`` decodes the caption's z_t instead of the prior's z_i (the paper's §5.1 ablation; no prior
needed); ``decode_base`` and ``upsample`` are the cascade's two halves (unclip-eval scores the upsampler against
bicubic on the same base samples).

On CUDA the networks run under bf16 autocast (sampler arithmetic stays float32).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from unclip.chain import Chain, load_chain
from unclip.decoder_sampling import edit_cascade, sample_decoder, sample_upsampler, sampling_process
from unclip.diffusion import classifier_free_guidance, create_diffusion, ddim_invert, sample_ddim
from unclip.diffusion.enums import ModelVarType
from unclip.images import load_images, load_mask, to_output
from unclip.models.degradations import downsample, upsample
from unclip.models.prior_sampling import sample_prior
from unclip.stages import DecoderInfo, UpsamplerInfo

PRIOR_KEYS = ("sampler", "steps", "guidance_scale", "candidates", "eta")
DECODER_KEYS = ("sampler", "steps", "spacing", "guidance_scale", "eta")
UPSAMPLER_KEYS = ("sampler", "steps", "spacing", "eta", "noise_aug_level")
LATENT_MODES = ("fixed", "inverted", "random")
# What text → image decodes: the prior's sample z_i (§2.2), or the caption's own CLIP text embedding z_t in its
# place (§5.1's ablation: unCLIP conditioned on text embeddings, no prior).
EMBEDDINGS = ("prior", "caption")


def stage_options(given: Mapping[str, Any] | None, valid: Sequence[str], stage: str) -> dict[str, Any]:
    """A stage's knobs with None values dropped; an unknown knob is an error naming the valid ones."""
    options = {k: v for k, v in dict(given or {}).items() if v is not None}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown {stage} option(s) {unknown}; valid: {list(valid)}")
    return options


def slerp(a: Tensor, b: Tensor, t: float | Tensor) -> Tensor:
    """Spherical interpolation between a and b along their last dimension (§3.2; for x_T: DDIM's recipe).

    Norms are interpolated along with the angle, so unit vectors stay unit and Gaussian latents keep their norm.
    Falls back to linear interpolation where a and b are (anti)parallel within float precision.

    :param a, b: [..., D] tensors of the same shape.
    :param t: 0 gives a, 1 gives b; a float or a tensor broadcastable to [..., 1].
    """
    a32, b32 = a.float(), b.float()
    t = torch.as_tensor(t, dtype=torch.float32, device=a.device)
    if t.ndim and t.shape[-1] != 1:
        t = t.unsqueeze(-1)
    cos = (F.normalize(a32, dim=-1) * F.normalize(b32, dim=-1)).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    safe = sin.abs() > 1e-6
    sin_safe = torch.where(safe, sin, torch.ones_like(sin))
    wa = torch.where(safe, torch.sin((1 - t) * omega) / sin_safe, 1 - t)
    wb = torch.where(safe, torch.sin(t * omega) / sin_safe, t)
    return (wa * a32 + wb * b32).to(a.dtype)


@dataclass
class PipelineOutput:
    """:param images: the images in the requested ``output_type``.
    :param image_embeds: [N, D] the CLIP image embeddings z_i that were decoded.
    :param prompts: the caption of each image (text modes), else None.
    :param raw: edits only: the images before compositing with the original."""

    images: Any
    image_embeds: Tensor
    prompts: list[str] | None = None
    raw: Any = None  # edits: the sampler's output before compositing with the original (same output_type)


class UnCLIPPipeline:
    """Text → image, variations, interpolations and text diffs from a :class:`~unclip.chain.Chain`.

    :param chain: loaded, validated checkpoints (:func:`unclip.chain.load_chain`).
    :param device: where the networks live (the chain is moved there).
    :param autocast: bf16 autocast for network calls; default: on for CUDA, off otherwise.
    """

    def __init__(self, chain: Chain, device: str | torch.device = "cpu", autocast: bool | None = None):
        self.device = torch.device(device)
        self.chain = chain
        for module in [chain.clip, chain.decoder.net, *(s.net for s in chain.upsamplers)] + (
                [chain.prior.net] if chain.prior else []):
            module.to(self.device)
        self.autocast = self.device.type == "cuda" if autocast is None else autocast

    @classmethod
    def from_checkpoints(cls, clip: str | Path, decoder: str | Path, prior: str | Path | None = None,
                         upsamplers: Sequence[str | Path] = (), device: str | torch.device | None = None,
                         autocast: bool | None = None) -> UnCLIPPipeline:
        """Load CLIP, prior, decoder and upsamplers (in cascade order), refusing a chain that does not fit.

        :param device: None picks CUDA when available.
        :raises unclip.chain.ChainError: different CLIPs, embedding sizes or resolutions, naming both sides.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(load_chain(clip, decoder, prior, upsamplers, device), device, autocast)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        autocast: bool | None = None, dtype: torch.dtype | str | None = torch.float32
                        ) -> UnCLIPPipeline:
        """Load a pipeline folder (:meth:`save_pretrained`, ``unclip-export --chain``): safetensors and JSON only,
        no pickle, no Lightning; the chain is checked as :meth:`from_checkpoints` checks it.

        :param dtype: the stages' weights are loaded in it (default float32, whatever they were stored in).
        :raises unclip.chain.ChainError: parts that do not fit, naming both; ``unclip.pretrained.PretrainedError``
            for a folder or file that is not what it should be, naming the file and field.
        """
        from unclip.pretrained import load_pipeline

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(load_pipeline(directory, device, dtype), device, autocast)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | str | None = None) -> Path:
        """Write the chain as a pipeline folder (``unclip.pretrained``; ``dtype``: the stages' stored weights)."""
        from unclip.pretrained import save_pipeline

        return save_pipeline(self.chain, directory, dtype)

    # ---- pieces -------------------------------------------------------------------------------------------

    @property
    def clip(self):
        return self.chain.clip

    @property
    def output_size(self) -> int:
        return self.chain.output_size

    @property
    def _decoder_info(self) -> DecoderInfo:
        info = self.chain.decoder.info
        if not isinstance(info, DecoderInfo):
            raise TypeError(f"the chain's decoder stage ({self.chain.decoder.path}) is described by a "
                            f"{type(info).__name__}, not a DecoderInfo")
        return info

    def _upsampler_info(self, k: int) -> UpsamplerInfo:
        stage = self.chain.upsamplers[k]
        if not isinstance(stage.info, UpsamplerInfo):
            raise TypeError(f"the chain's upsampler {k} ({stage.path}) is described by a "
                            f"{type(stage.info).__name__}, not an UpsamplerInfo")
        return stage.info

    def _autocast(self):
        if self.autocast and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        return g

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Captions → ``{"text_embed" [N, D], "text_tokens" [N, ctx, W], "text_mask" [N, ctx]}``."""
        with self._autocast():
            out = self.clip.embed_text(self.clip.tokenize(list(prompts)))
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}

    @torch.no_grad()
    def encode_images(self, images: Any) -> Tensor:
        """User images (see :func:`unclip.images.load_images`) → unit-norm CLIP image embeddings z_i [N, D]."""
        with self._autocast():
            return self.clip.embed_images(load_images(images).to(self.device)).float()

    def prior_embeddings(self, text: Mapping[str, Tensor], generator: torch.Generator,
                         options: Mapping[str, Any] | None = None) -> Tensor:
        """Sample z_i for encoded captions with the prior (§2.2)."""
        if self.chain.prior is None:
            raise ValueError("text-to-image needs a prior: load the pipeline with prior=<prior checkpoint>")
        prior = self.chain.prior
        opts = {**prior.info.sampling, **stage_options(options, PRIOR_KEYS, "prior")}
        with self._autocast():
            return sample_prior(prior.net, text, create_diffusion(**prior.info.diffusion), generator=generator,
                                **opts)

    def image_embeddings(self, text: Mapping[str, Tensor], generator: torch.Generator,
                         options: Mapping[str, Any] | None = None, embedding: str = "prior") -> Tensor:
        """The embeddings [N, D] text → image decodes: the prior's z_i, or with ``embedding="caption"`` the
        captions' unit-norm CLIP text embeddings z_t as they are (no prior is run or needed; no randomness drawn).

        :param text: :meth:`encode_text`'s output for N captions.
        """
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if embedding == "caption":
            return text["text_embed"].to(self.device)
        return self.prior_embeddings(text, generator, options)

    def _decoder_text(self, text: Mapping[str, Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
        """(text_tokens, text_mask) for the decoder: None, None unless it reads captions."""
        if text is None or not self._decoder_info.text_conditioning:
            return None, None
        return text["text_tokens"], text["text_mask"]

    @torch.no_grad()
    def decode(self, image_embed: Tensor, text: Mapping[str, Tensor] | None, generator: torch.Generator,
               decoder: Mapping[str, Any] | None = None, upsamplers: Any = None, noise: Tensor | None = None,
               progress: bool = False) -> Tensor:
        """z_i (and optionally encoded captions) → final images [N, 3, S, S] in [-1, 1] through the cascade.

        :param noise: the decoder's starting latent x_T [N, 3, s, s] (e.g. from :meth:`invert`); None draws it.
        """
        base = self.decode_base(image_embed, text, generator, decoder, noise, progress)
        return self.upsample(base, generator, upsamplers, progress)

    @torch.no_grad()
    def decode_base(self, image_embed: Tensor, text: Mapping[str, Tensor] | None, generator: torch.Generator,
                    decoder: Mapping[str, Any] | None = None, noise: Tensor | None = None,
                    progress: bool = False) -> Tensor:
        """The base decoder alone: z_i [N, D] (and optionally encoded captions) → [N, 3, s, s] images in [-1, 1]."""
        dec = self.chain.decoder
        with self._autocast():
            images = sample_decoder(dec.net, self._decoder_info, image_embed.to(self.device), *self._decoder_text(text),
                                    generator=generator, noise=noise, progress=progress,
                                    **stage_options(decoder, DECODER_KEYS, "decoder"))
        return images.float()

    def _upsampler_options(self, upsamplers: Any) -> list[Mapping[str, Any] | None]:
        n = len(self.chain.upsamplers)
        if upsamplers is None or isinstance(upsamplers, Mapping):
            return [upsamplers] * n
        upsamplers = list(upsamplers)
        if len(upsamplers) != n:
            raise ValueError(f"got options for {len(upsamplers)} upsamplers, the chain has {n}")
        return upsamplers

    def _decoder_sampling(self, options: Mapping[str, Any] | None) -> tuple[Any, Any, dict]:
        """(guided decoder, its respaced chain, resolved options) for DDIM inversion and DDIM decoding."""
        dec = self.chain.decoder
        opts = {**dec.info.sampling, **stage_options(options, DECODER_KEYS, "decoder")}
        process = sampling_process(dec.info.diffusion, opts["steps"], opts["spacing"])
        learned = process.var_type == ModelVarType.LEARNED_RANGE
        guided = classifier_free_guidance(dec.net, float(opts["guidance_scale"]), drop_key="cond_drop",
                                          learned_variance=learned)
        return guided, process, opts

    def _base_size(self, images: Tensor) -> Tensor:
        size = self.chain.decoder.info.image_size
        if images.shape[-1] == size and images.shape[-2] == size:
            return images
        return downsample(images, size) if images.shape[-1] > size else upsample(images, size)

    @torch.no_grad()
    def invert(self, images: Any, image_embed: Tensor | None = None, decoder: Mapping[str, Any] | None = None,
               iters: int = 0, progress: bool = False) -> Tensor:
        """DDIM-invert images into the decoder's latent x_T (§3.1), conditioned on their own z_i.

        Uses the decoder's sampling steps and spacing and the same guidance as decoding, so decoding the result
        with DDIM η = 0 and the same options reconstructs the image (up to the inversion's step error, which
        ``iters`` removes for well-trained networks). x̂₀ is not clipped on either side: a clip in the middle of
        the chain is not invertible.

        :param images: user images; resized to the decoder's size.
        :param iters: fixed-point refinements per step (:func:`unclip.diffusion.ddim_invert`).
        :return: [N, 3, s, s] latents.
        """
        x = self._base_size(load_images(images).to(self.device))
        z = self.encode_images(x) if image_embed is None else image_embed.to(self.device)
        guided, process, opts = self._decoder_sampling(decoder)
        with self._autocast():
            return ddim_invert(guided, x, process, {"image_embed": z}, progress=progress, fixed_point_iters=iters,
                               clip_denoised=False).float()

    def settings(self, prior: Mapping[str, Any] | None = None, decoder: Mapping[str, Any] | None = None,
                 upsamplers: Any = None) -> dict[str, Any]:
        """The sampling options each stage will run with: the given knobs over each checkpoint's own sampling
        defaults. For reports and ``samples.json``."""
        options = zip(self.chain.upsamplers, self._upsampler_options(upsamplers), strict=True)
        out: dict[str, Any] = {"decoder": {**self.chain.decoder.info.sampling,
                                           **stage_options(decoder, DECODER_KEYS, "decoder")},
                               "upsamplers": [{**s.info.sampling, **stage_options(o, UPSAMPLER_KEYS, "upsampler")}
                                              for s, o in options]}
        if self.chain.prior is not None:
            out["prior"] = {**self.chain.prior.info.sampling, **stage_options(prior, PRIOR_KEYS, "prior")}
        return out

    # ---- modes --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], num_images_per_prompt: int = 1, *,
                 prior: Mapping[str, Any] | None = None, decoder: Mapping[str, Any] | None = None,
                 upsamplers: Any = None, batch_size: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", embedding: str = "prior",
                 progress: bool = False) -> PipelineOutput:
        """Text → images.

        :param prompts: one caption or a list; each gives ``num_images_per_prompt`` images, in prompt order.
        :param batch_size: images sampled at once (None: all).
        :param seed, generator: the randomness (a generator wins); the same seed gives the same images.
        :param output_type: "pil", "np" or "pt" (:func:`unclip.images.to_output`).
        :param embedding: "prior" (z_i sampled by the prior) or "caption" (the caption's z_t decoded directly,
            §5.1's ablation; ``image_embeds`` then holds z_t).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if num_images_per_prompt < 1 or not prompts:
            raise ValueError("need at least one prompt and num_images_per_prompt >= 1")
        captions = [p for p in prompts for _ in range(num_images_per_prompt)]
        g = self._generator(seed, generator)
        size = batch_size or len(captions)
        images, embeds = [], []
        chunks = range(0, len(captions), size)
        for start in tqdm(chunks, desc="text→image", disable=not progress or len(chunks) == 1):
            text = self.encode_text(captions[start:start + size])
            z = self.image_embeddings(text, g, prior, embedding)
            images.append(self.decode(z, text, g, decoder, upsamplers, progress=progress))
            embeds.append(z)
        return PipelineOutput(to_output(torch.cat(images), output_type), torch.cat(embeds), captions)

    @torch.no_grad()
    def variations(self, image: Any, num_variations: int = 4, eta: float = 1.0, *,
                   decoder: Mapping[str, Any] | None = None, upsamplers: Any = None, inversion_iters: int = 0,
                   seed: int | None = None, generator: torch.Generator | None = None, output_type: str = "pil",
                   progress: bool = False) -> PipelineOutput:
        """Variations of one image (§3.1): keep its z_i and DDIM-inverted x_T, decode with DDIM at ``eta``.

        η = 0 reconstructs the image; larger η keeps what z_i captures (content, style) and varies the rest.
        """
        x = load_images(image)[:1].to(self.device)
        z = self.encode_images(x)
        x_t = self.invert(x, z, decoder, inversion_iters, progress)
        g = self._generator(seed, generator)
        n = int(num_variations)
        base = self._ddim_decode(x_t.expand(n, -1, -1, -1), z.expand(n, -1), eta, decoder, g, progress)
        return PipelineOutput(to_output(self.upsample(base, g, upsamplers, progress), output_type), z.expand(n, -1))

    def _ddim_decode(self, x_t: Tensor, z: Tensor, eta: float, decoder: Mapping[str, Any] | None,
                     generator: torch.Generator, progress: bool) -> Tensor:
        """DDIM from given latents, x̂₀ unclipped as in :meth:`invert` (the result is clamped)."""
        guided, process, _ = self._decoder_sampling(decoder)
        with self._autocast():
            out = sample_ddim(guided, x_t.contiguous(), process, {"image_embed": z.contiguous()}, eta=float(eta),
                              generator=generator, clip_denoised=False, progress=progress)
        return out.float().clamp(-1, 1)

    @torch.no_grad()
    def upsample(self, images: Tensor, generator: torch.Generator, upsamplers: Any = None,
                 progress: bool = False) -> Tensor:
        """Base images [N, 3, s, s] in [-1, 1] → [N, 3, S, S] through every upsampler (none: unchanged)."""
        with self._autocast():
            for k, (stage, opts) in enumerate(zip(self.chain.upsamplers, self._upsampler_options(upsamplers),
                                                  strict=True)):
                images = sample_upsampler(stage.net, self._upsampler_info(k), images.float(), generator=generator,
                                          progress=progress, **stage_options(opts, UPSAMPLER_KEYS, f"upsampler {k}"))
        return images.float()

    @torch.no_grad()
    def interpolate(self, image_a: Any, image_b: Any, n: int = 5, *, latents: str = "fixed", eta: float = 0.0,
                    decoder: Mapping[str, Any] | None = None, upsamplers: Any = None, inversion_iters: int = 0,
                    seed: int | None = None, generator: torch.Generator | None = None, output_type: str = "pil",
                    progress: bool = False) -> PipelineOutput:
        """Interpolate two images (§3.2): z_θ = slerp(z_a, z_b, θ) for θ = 0 … 1 in ``n`` steps.

        :param latents: the decoder latent along the path: "fixed" (one random x_T for the whole path, the paper's
            Figure 4), "inverted" (slerp of the two images' DDIM-inverted latents: the end points reconstruct the
            images) or "random" (a fresh x_T per frame).
        """
        if latents not in LATENT_MODES:
            raise ValueError(f"latents must be one of {LATENT_MODES}, got {latents!r}")
        if n < 2:
            raise ValueError(f"n must be >= 2 (the two end points), got {n}")
        x = torch.cat([load_images(image_a)[:1], load_images(image_b)[:1]]).to(self.device)
        z = self.encode_images(x)  # [2, D]
        thetas = torch.linspace(0, 1, n, device=self.device)[:, None]
        z_path = F.normalize(slerp(z[:1], z[1:], thetas), dim=-1)  # [n, D]
        g = self._generator(seed, generator)
        size = self.chain.decoder.info.image_size
        shape = (n, self.chain.decoder.net.in_channels, size, size)
        if latents == "inverted":
            x_t = self.invert(x, z, decoder, inversion_iters, progress)  # [2, 3, s, s]
            flat = slerp(x_t[:1].flatten(1), x_t[1:].flatten(1), thetas)
            x_path = flat.view(shape)
        elif latents == "fixed":
            x_path = torch.randn(shape[1:], generator=g, device=self.device).expand(shape)
        else:
            x_path = torch.randn(shape, generator=g, device=self.device)
        base = self._ddim_decode(x_path, z_path, eta, decoder, g, progress)
        return PipelineOutput(to_output(self.upsample(base, g, upsamplers, progress), output_type), z_path)

    @torch.no_grad()
    def text_diff(self, image: Any, from_caption: str, to_caption: str, thetas: Sequence[float] = (0.0, 0.25, 0.5),
                  *, decoder: Mapping[str, Any] | None = None, upsamplers: Any = None, inversion_iters: int = 0,
                  seed: int | None = None, generator: torch.Generator | None = None, output_type: str = "pil",
                  progress: bool = False) -> PipelineOutput:
        """Edit an image towards a caption with a text diff (§3.3).

        z_d = normalise(z_t(to) − z_t(from)); frames decode z_θ = slerp(z_i, z_d, θ) from the image's fixed
        DDIM-inverted latent with DDIM η = 0 (θ = 0 reconstructs the image; the paper goes up to θ ≈ 0.5).
        """
        x = load_images(image)[:1].to(self.device)
        z = self.encode_images(x)
        text = self.encode_text([from_caption, to_caption])["text_embed"]
        z_d = F.normalize(text[1:] - text[:1], dim=-1)
        if not math.isfinite(float(z_d.norm())) or float((text[1] - text[0]).norm()) < 1e-6:
            raise ValueError(f"from_caption and to_caption embed identically ({from_caption!r}); no direction")
        t = torch.tensor(list(thetas), dtype=torch.float32, device=self.device)[:, None]
        z_path = F.normalize(slerp(z.expand(len(t), -1), z_d.expand(len(t), -1), t), dim=-1)
        x_t = self.invert(x, z, decoder, inversion_iters, progress)
        g = self._generator(seed, generator)
        base = self._ddim_decode(x_t.expand(len(t), -1, -1, -1), z_path, 0.0, decoder, g, progress)
        return PipelineOutput(to_output(self.upsample(base, g, upsamplers, progress), output_type), z_path)

    @torch.no_grad()
    def edit(self, image: Any, mask: Any, prompt: str | None = None, num_images: int = 1, *,
             reference_image: Any = None, method: str = "auto", prior: Mapping[str, Any] | None = None,
             decoder: Mapping[str, Any] | None = None, upsamplers: Any = None, jump_length: int = 1,
             jump_n_sample: int = 1, seed: int | None = None, generator: torch.Generator | None = None,
             output_type: str = "pil", progress: bool = False) -> PipelineOutput:
        """Text-guided editing inside a mask (GLIDE-style inpainting through the decoder cascade).

        The decoder is conditioned on the prompt's z_i from the prior (and on the prompt's tokens when it reads
        captions), or on ``reference_image``'s CLIP embedding. An inpainting decoder (``model.inpaint``) sees the
        masked image; any other decoder edits training-free by RePaint replacement (``jump_length`` /
        ``jump_n_sample`` > 1 add resampling). The upsamplers keep the known pixels at their resolution, and the
        result equals the input exactly outside the mask, at the input's size.

        :param image: one image (path, PIL, uint8 array or [3, H, W] tensor in [-1, 1]).
        :param mask: same size as the image; 1 / white = generate, 0 / black = keep. A path or PIL image is read as
            grayscale and thresholded at 128; tensors and arrays must already be binary (else a clear error).
        :param method: "auto" (inpaint when the decoder can, else repaint), "inpaint" or "repaint".
        """
        if (prompt is None) == (reference_image is None):
            raise ValueError("edit needs exactly one of prompt (through the prior) or reference_image")
        x = load_images(image)[:1].to(self.device)
        m = load_mask(mask).to(self.device)
        n = int(num_images)
        g = self._generator(seed, generator)
        text = None
        if prompt is not None:
            text = self.encode_text([prompt] * n)
            z = self.prior_embeddings(text, g, prior)
        else:
            z = self.encode_images(reference_image)[:1].expand(n, -1)
        dec_opts = {**stage_options(decoder, DECODER_KEYS, "decoder"), "jump_length": int(jump_length),
                    "jump_n_sample": int(jump_n_sample)}
        up_opts = [{**stage_options(o, UPSAMPLER_KEYS, f"upsampler {k}"), "jump_length": int(jump_length),
                    "jump_n_sample": int(jump_n_sample)} for k, o in enumerate(self._upsampler_options(upsamplers))]
        with self._autocast():
            out = edit_cascade((self.chain.decoder.net, self._decoder_info),
                               [(s.net, self._upsampler_info(k)) for k, s in enumerate(self.chain.upsamplers)],
                               x.expand(n, -1, -1, -1), m.expand(n, -1, -1, -1), z, *self._decoder_text(text),
                               method=method,
                               decoder_options=dec_opts, upsampler_options=up_opts, generator=g, progress=progress)
        return PipelineOutput(to_output(out.image.float(), output_type), z, [prompt] * n if prompt else None,
                              raw=to_output(out.raw.float(), output_type))
