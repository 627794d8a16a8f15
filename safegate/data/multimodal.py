"""Multimodal model inputs: chat prompt, expanded image/audio placeholders and feature tensors, as processors do.

`MultimodalInputBuilder` turns user prompts plus per-row images and audio clips into the exact keyword arguments a
multimodal backbone takes (`input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`, `input_features`,
`feature_attention_mask`, `mm_token_type_ids`). Which placeholder tokens to use, and whether `mm_token_type_ids`
is needed, comes from the architecture spec (`adapters/<model_type>.toml`), the ids themselves from the model
config. With a full transformers processor (one that has an image processor or feature extractor) the builder
calls it; with a bare tokenizer it runs the image processor / feature extractor itself (pillow- and numpy-only
ones by default: `Qwen2VLImageProcessorPil`, `CLIPImageProcessorPil`, `WhisperFeatureExtractor`) and expands the
placeholders exactly as the Qwen2-VL / Qwen2.5-Omni / LLaVA processors do. That second path is what works
without torchvision, which the Qwen-VL and Omni processors require.

Training collators use `encode(..., padding=False)`, append the safety token and answer ids per row, pad, and
recompute `mm_token_type_ids` with `token_type_ids` for the final ids.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> from safegate.testing.multimodal import tiny_multimodal
    >>> model, tok = tiny_multimodal("qwen2_vl")
    >>> builder = MultimodalInputBuilder(model, tok)
    >>> image = Image.fromarray(np.zeros((56, 56, 3), dtype=np.uint8))
    >>> batch = builder.encode(["What is this?", "Hello"], images=[[image], None])
    >>> sorted(batch)
    ['attention_mask', 'image_grid_thw', 'input_ids', 'mm_token_type_ids', 'pixel_values']
    >>> int((batch["input_ids"] == model.config.image_token_id).sum()), batch["image_grid_thw"].tolist()
    (4, [[1, 4, 4]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from safegate.modeling.arch import MULTIMODAL_INPUTS, ArchSpec, load_specs, unwrap
from safegate.modeling.tokens import text_tokenizer

IMAGE, AUDIO = "image", "audio"
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
FEATURE_KEYS = MULTIMODAL_INPUTS  # per-item (not per-token) inputs: images, videos, audio clips
_MM_TYPE = {IMAGE: 1, "video": 2}  # the values transformers' `ProcessorMixin.create_mm_token_type_ids` uses


@dataclass(frozen=True)
class Placeholder:
    """One modality's prompt tokens: `start + token × n + end` (`start`/`end` may be empty, as in LLaVA)."""

    token: str
    token_id: int
    start: str = ""
    end: str = ""

    def single(self) -> str:
        """The unexpanded form a processor's chat template writes for one item."""
        return f"{self.start}{self.token}{self.end}"


def audio_output_lengths(feature_lengths: torch.Tensor) -> torch.Tensor:
    """Audio placeholder count per clip from its mel-frame count (Whisper-style conv stride 2, then pooling 2)."""
    after_conv = (feature_lengths - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class MultimodalInputBuilder:
    """Build model inputs with images and audio for one backbone (see the module docstring).

    Args:
        model: the Hugging Face model (full model or the module that generates text) or its config.
        processor: a transformers processor or the plain tokenizer.
        image_processor: used when `processor` has none; default built from the vision config (pillow-only).
        feature_extractor: used when `processor` has none; default `WhisperFeatureExtractor(num_mel_bins)`.
    """

    def __init__(self, model: Any, processor: Any, image_processor: Any = None, feature_extractor: Any = None) -> None:
        self.config = _text_generating_config(model)
        self.spec: ArchSpec = load_specs().get(self.config.model_type) or ArchSpec(model_type=self.config.model_type)
        self.tokenizer = text_tokenizer(processor)
        is_full = processor is not self.tokenizer and callable(processor)
        self.processor = processor if is_full and _has_any(processor, "image_processor", "feature_extractor") else None
        self.image_processor = image_processor or getattr(processor, "image_processor", None)
        self.feature_extractor = feature_extractor or getattr(processor, "feature_extractor", None)
        self.placeholders = {m: self._placeholder(m) for m in (IMAGE, AUDIO) if m in self.spec.modalities}
        self.needs_token_types = "mm_token_type_ids" in self.spec.required_inputs

    @property
    def modalities(self) -> tuple[str, ...]:
        """Input modalities besides text this backbone takes (`image`, `audio`)."""
        return tuple(self.placeholders)

    def _placeholder(self, modality: str) -> Placeholder:
        fields = self.spec.placeholders
        if modality not in fields:
            raise ValueError(
                f"the spec for {self.spec.model_type!r} lists modality {modality!r} but no `placeholders.{modality}` "
                "config field; see adapters/README.md."
            )

        def token(key: str) -> str:
            if key not in fields:
                return ""
            token_id = getattr(self.config, fields[key], None)
            if token_id is None:
                raise ValueError(f"the model config has no `{fields[key]}` (spec `placeholders.{key}`).")
            return str(self.tokenizer.convert_ids_to_tokens(int(token_id)))

        main = token(modality)
        return Placeholder(
            main, int(getattr(self.config, fields[modality])), token(f"{modality}_start"), token(f"{modality}_end")
        )

    # ------------------------------------------------------------------------------------------------ text
    def content(self, text: str, n_images: int = 0, n_audios: int = 0) -> str:
        """User-message content: one unexpanded placeholder per image, then per audio clip, then `text`."""
        parts: list[str] = []
        sep = ""
        for modality, count in ((IMAGE, n_images), (AUDIO, n_audios)):
            if count and modality not in self.placeholders:
                raise ValueError(
                    f"{self.spec.model_type!r} takes {list(self.modalities) or 'no'} inputs besides text, "
                    f"got {count} {modality} item(s)."
                )
            if count:
                parts += [self.placeholders[modality].single()] * count
                sep = "" if self.placeholders[modality].end else "\n"  # LLaVA style: `<image>\n` + text
        return "".join(parts) + sep + text

    def chat_text(self, prompt: str, n_images: int = 0, n_audios: int = 0, system: str | None = None) -> str:
        """The prompt through the chat template (generation header added), placeholders not yet expanded."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": self.content(prompt, n_images, n_audios)})
        owner = self.tokenizer if getattr(self.tokenizer, "chat_template", None) else self.processor
        if owner is None or not getattr(owner, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass `templated=True` with formatted prompts.")
        return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ---------------------------------------------------------------------------------------------- encode
    def encode(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Any] | None] | None = None,
        audios: Sequence[Sequence[Any] | None] | None = None,
        *,
        system: str | None = None,
        templated: bool = False,
        padding: bool = True,
    ) -> dict[str, Any]:
        """Model inputs for `prompts` with per-row `images` (PIL images / HWC arrays) and `audios` (1-D float arrays).

        Args:
            prompts: user texts, or with `templated=True` full prompt texts holding one unexpanded placeholder
                per item (see `content`).
            images: per row a list of images or `None`.
            audios: per row a list of waveforms at the feature extractor's sampling rate (16 kHz), or `None`.
            system: optional system message (ignored with `templated=True`).
            templated: the prompts are already formatted.
            padding: left-pad into tensors; with `False` the per-token entries are unpadded lists of ints.

        Returns:
            `input_ids`, `attention_mask`, the feature tensors of the modalities present and, when the spec
            requires it, `mm_token_type_ids`.
        """
        images = _per_row(images, len(prompts), "images")
        audios = _per_row(audios, len(prompts), "audios")
        if templated:
            texts = list(prompts)
        else:
            texts = [self.chat_text(p, len(i), len(a), system) for p, i, a in zip(prompts, images, audios)]
        for row, text in enumerate(texts):
            self._check_counts(row, text, len(images[row]), len(audios[row]))
        flat_images = [img for row in images for img in row]
        flat_audios = [np.asarray(a, dtype=np.float32) for row in audios for a in row]
        if self.processor is not None:
            batch = self._call_processor(texts, flat_images, flat_audios)
        else:
            batch = self._by_hand(texts, flat_images, flat_audios)
        if self.needs_token_types:
            batch["mm_token_type_ids"] = self.token_type_ids(batch["input_ids"])
        elif "mm_token_type_ids" in batch:
            del batch["mm_token_type_ids"]  # the model does not take it
        if not padding:
            mask = batch["attention_mask"].bool()
            for key in PER_TOKEN_KEYS:
                if key in batch:
                    batch[key] = [row[m].tolist() for row, m in zip(batch[key], mask)]
        return batch

    __call__ = encode

    def token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`mm_token_type_ids` for `input_ids` (0 text, 1 image, 2 video), as Qwen-VL processors build it."""
        out = torch.zeros_like(input_ids)
        for modality, value in _MM_TYPE.items():
            field = self.spec.placeholders.get(modality)
            token_id = getattr(self.config, field, None) if field else None
            if token_id is not None:
                out[input_ids == int(token_id)] = value
        return out

    def _check_counts(self, row: int, text: str, n_images: int, n_audios: int) -> None:
        for modality, count in ((IMAGE, n_images), (AUDIO, n_audios)):
            ph = self.placeholders.get(modality)
            found = text.count(ph.token) if ph else 0
            if found != count:
                raise ValueError(
                    f"row {row}: the prompt holds {found} {modality} placeholder(s) but {count} {modality} item(s) "
                    f"were given; write one {ph.single() if ph else modality!r} per item (see `content`)."
                )

    def _call_processor(self, texts: list[str], images: list[Any], audios: list[np.ndarray]) -> dict[str, Any]:
        assert self.processor is not None
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if audios:
            kwargs["audio"] = audios
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            return dict(self.processor(**kwargs))
        finally:
            self.tokenizer.padding_side = side

    def _by_hand(self, texts: list[str], images: list[Any], audios: list[np.ndarray]) -> dict[str, Any]:
        features: dict[str, torch.Tensor] = {}
        counts: dict[str, list[int]] = {IMAGE: [], AUDIO: []}
        if images:
            features.update(self._image_features(images))
            counts[IMAGE] = self._image_token_counts(features)
        if audios:
            features.update(self._audio_features(audios))
            counts[AUDIO] = audio_output_lengths(features["feature_attention_mask"].sum(-1)).tolist()
        expanded = [self._expand(text, counts) for text in texts]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(expanded, padding=True, return_tensors="pt", add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **features}

    def _expand(self, text: str, counts: dict[str, list[int]]) -> str:
        """Replace each unexpanded placeholder by `token × n`, consuming `counts` in order (as processors do)."""
        for modality, ph in self.placeholders.items():
            pieces = text.split(ph.token)
            out = [pieces[0]]
            for piece in pieces[1:]:
                out.append(ph.token * counts[modality].pop(0) + piece)
            text = "".join(out)
        return text

    # -------------------------------------------------------------------------------------------- features
    def _vision_config(self) -> Any:
        vision = getattr(self.config, "vision_config", None)
        if vision is None:
            raise ValueError(f"{self.spec.model_type!r} has no vision_config; it takes no images.")
        return vision

    def _image_features(self, images: list[Any]) -> dict[str, torch.Tensor]:
        if self.image_processor is None:
            self.image_processor = default_image_processor(self.config)
        out = self.image_processor(images, return_tensors="pt")
        return {k: out[k] for k in ("pixel_values", "image_grid_thw") if k in out}

    def _image_token_counts(self, features: dict[str, torch.Tensor]) -> list[int]:
        vision = self._vision_config()
        if "image_grid_thw" in features:  # Qwen-VL / Omni: patches merged spatial_merge_size² → 1
            merge = int(vision.spatial_merge_size)
            return (features["image_grid_thw"].prod(-1) // merge**2).tolist()
        _, _, height, width = features["pixel_values"].shape  # LLaVA / CLIP: one token per patch
        per_image = (height // vision.patch_size) * (width // vision.patch_size)
        if getattr(self.config, "vision_feature_select_strategy", "default") == "full":
            per_image += 1
        return [per_image] * features["pixel_values"].shape[0]

    def _audio_features(self, audios: list[np.ndarray]) -> dict[str, torch.Tensor]:
        if self.feature_extractor is None:
            self.feature_extractor = default_feature_extractor(self.config)
        fe = self.feature_extractor
        out = fe(
            audios,
            sampling_rate=fe.sampling_rate,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="pt",
        )  # Qwen2.5-Omni's processor pads to max_length and renames the mask
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}


class MultimodalProcessor:
    """A transformers-style processor for one backbone, built from its tokenizer, for when the real one cannot be.

    The Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni processors need torchvision; this stand-in produces the same inputs
    from pillow / numpy components (see `MultimodalInputBuilder`). It follows the processor conventions safegate
    and the training collator use: `.tokenizer`, `.chat_template`, `apply_chat_template` with `{"type": "image"}`
    / `{"type": "audio"}` content parts, and `__call__(text=, images=, audio=)` with one unexpanded placeholder per
    item in `text`. `safegate.attach(model, MultimodalProcessor(model, tok))` adds the safety tokens to `tok`.

    Example:
        >>> from safegate.testing.multimodal import tiny_multimodal, random_image
        >>> model, tok = tiny_multimodal("llava")
        >>> processor = MultimodalProcessor(model, tok)
        >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        >>> prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        >>> prompt
        '<|im_start|>user\\n<image>\\nWhat is it?<|im_end|>\\n<|im_start|>assistant\\n'
        >>> batch = processor(text=[prompt], images=[random_image(0, "x", 0, (28, 28))], return_tensors="pt")
        >>> int((batch["input_ids"] == model.config.image_token_id).sum()), tuple(batch["pixel_values"].shape)
        (4, (1, 3, 28, 28))
    """

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any = None, feature_extractor: Any = None) -> None:
        self.builder = MultimodalInputBuilder(model, tokenizer, image_processor, feature_extractor)
        self.tokenizer = self.builder.tokenizer
        self.chat_template = getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any:
        """The tokenizer's chat template, with media content parts rendered as unexpanded placeholders."""
        messages = [{**m, "content": self._content(m.get("content"))} for m in conversation]
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def _content(self, content: Any) -> str:
        if content is None or isinstance(content, str):
            return content or ""
        types = [part.get("type") for part in content]
        text = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
        return self.builder.content(text, types.count("image"), types.count("audio"))

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        padding: bool = True,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Encode formatted `text` holding one placeholder per item of `images` / `audio` (in order)."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"`return_tensors` must be 'pt', got {return_tensors!r}.")
        texts = [text] if isinstance(text, str) else list(text)
        row_images = self._split(texts, list(images or []), IMAGE)
        row_audios = self._split(texts, list(audio or []), AUDIO)
        return self.builder.encode(texts, row_images, row_audios, templated=True, padding=bool(padding))

    def _split(self, texts: list[str], items: list[Any], modality: str) -> list[list[Any]]:
        ph = self.builder.placeholders.get(modality)
        counts = [t.count(ph.token) if ph else 0 for t in texts]
        if sum(counts) != len(items):
            raise ValueError(
                f"`text` holds {sum(counts)} {modality} placeholder(s) but {len(items)} {modality} item(s) were given."
            )
        rows, start = [], 0
        for n in counts:
            rows.append(items[start : start + n])
            start += n
        return rows

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def default_image_processor(config: Any) -> Any:
    """A pillow-only image processor matching the vision config (no torchvision needed).

    Qwen-style towers (`spatial_merge_size` in the vision config): `Qwen2VLImageProcessorPil`; CLIP-style
    towers (LLaVA): `CLIPImageProcessorPil` resizing and cropping to `vision_config.image_size`.
    """
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise ValueError(f"{config.model_type!r} has no vision_config; it takes no images.")
    if hasattr(vision, "spatial_merge_size"):
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )
    from transformers import CLIPImageProcessorPil

    size = int(vision.image_size)
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def default_feature_extractor(config: Any, chunk_length: int = 30) -> Any:
    """`WhisperFeatureExtractor` with the audio tower's mel-bin count (numpy only)."""
    audio = getattr(config, "audio_config", None)
    if audio is None:
        raise ValueError(f"{config.model_type!r} has no audio_config; it takes no audio.")
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=int(audio.num_mel_bins), chunk_length=chunk_length)


def build_multimodal_inputs(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any] | None] | None = None,
    audios: Sequence[Sequence[Any] | None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """One-call form of `MultimodalInputBuilder(model, processor).encode(prompts, images, audios, **kwargs)`.

    `image_processor=` and `feature_extractor=` go to the builder; everything else to `encode`.
    """
    extra = {k: kwargs.pop(k) for k in ("image_processor", "feature_extractor") if k in kwargs}
    return MultimodalInputBuilder(model, processor, **extra).encode(prompts, images, audios, **kwargs)


def _text_generating_config(model: Any) -> Any:
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        spec = load_specs().get(model.model_type)
        if spec is not None and spec.unwrap:  # e.g. Qwen2.5-Omni: `thinker` → `thinker_config`
            return getattr(model, f"{spec.unwrap}_config")
        return model
    return unwrap(model).config


def _has_any(obj: Any, *names: str) -> bool:
    return any(getattr(obj, name, None) is not None for name in names)


def _per_row(items: Sequence[Sequence[Any] | None] | None, n: int, name: str) -> list[list[Any]]:
    if items is None:
        return [[] for _ in range(n)]
    if len(items) != n:
        raise ValueError(
            f"`{name}` must hold one entry (a list or None) per prompt: got {len(items)} for {n} prompts."
        )
    return [list(row) if row is not None else [] for row in items]
