"""The ``image_proj`` / ``ip_adapter`` container: IP-Adapter, FaceID and InstantID's Image Adapter.

The projection's keys decide the kind, one function each: FaceID-Plus (MLP + perceiver),
Resampler (plus, plus-face, InstantID, portrait-unnorm), MLP (full-face), FaceID MLP (faceid,
portrait) and linear (standard, light, vit-G, sdxl). Where layouts are identical on disk the
file name decides, and ``hints`` says so.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .containers import fail
from .model_info import CLIP_BY_PROJECTION, CLIP_VISION, CONTEXT_DIM, CROSS_ATTENTION_LAYERS, Layout, ModelInfo, Shape
from .shapes import layer_indices, resampler_params


def ip_layer_indices(ip_adapter: dict) -> List[int]:
    """Cross-attention layer numbers of an ``ip_adapter`` section in UNet order (sorted as integers)."""
    return layer_indices(ip_adapter, "to_k_ip.weight")


def _ip_layers(layout: Layout, where: str) -> Tuple[str, int, List[int]]:
    """Base model, context width and layer indices of the ``ip_adapter`` section, checked for gaps."""
    ip = layout.section("ip_adapter")
    idx = ip_layer_indices(ip)
    if not idx:
        fail(layout.path, f"{where}: the ip_adapter section has no to_k_ip weights")
    first = ip[f"{idx[0]}.to_k_ip.weight"]
    if len(first) != 2:
        fail(layout.path, f"{where}: {idx[0]}.to_k_ip.weight has shape {list(first)}, expected 2-D")
    context = first[1]
    base = CONTEXT_DIM.get(context)
    if base is None:
        fail(layout.path, f"{where}: cross-attention width {context} is neither SD1.5 (768) nor SDXL (2048)")
    want = CROSS_ATTENTION_LAYERS[base]
    expected = [2 * m + 1 for m in range(want)]
    if idx != expected:
        missing = sorted(set(expected) - set(idx))[:5]
        extra = sorted(set(idx) - set(expected))[:5]
        fail(
            layout.path,
            f"{where}: the ip_adapter section has {len(idx)} cross-attention layers, {base.upper()} has {want}"
            + (f"; missing e.g. {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else ""),
        )
    for i in idx:
        if f"{i}.to_v_ip.weight" not in ip:
            fail(layout.path, f"{where}: {i}.to_v_ip.weight is missing")
    return base, context, idx


def _lora_rank(layout: Layout, ip: Dict[str, Shape], base: str) -> Optional[int]:
    """Rank of the FaceID LoRA that rides in the ip_adapter section, or None; every attention must carry it."""
    if "0.to_q_lora.down.weight" not in ip:
        return None
    want = 2 * CROSS_ATTENTION_LAYERS[base]
    have = len(layer_indices(ip, "to_q_lora.down.weight"))
    if have != want:
        fail(layout.path, f"FaceID LoRA: {have} attention layers carry LoRA, {base.upper()} has {want}")
    return ip["0.to_q_lora.down.weight"][0]


class _Context:
    """What every projection detector needs: the layout, name hints, base and the shared params."""

    def __init__(self, layout: Layout, names: str):
        self.layout = layout
        self.names = names
        self.proj = layout.section("image_proj")
        if not self.proj:
            fail(layout.path, "the file has an ip_adapter section but no image_proj section; it is incomplete")
        self.base, self.context, idx = _ip_layers(layout, "IP-Adapter")
        ip = layout.section("ip_adapter")
        self.lora_rank = _lora_rank(layout, ip, self.base)
        # ip_hidden_sizes: the UNet width of each cross-attention, in layer order (to_k_ip rows).
        self.params = {
            "cross_attention_dim": self.context,
            "ip_layers": len(idx),
            "ip_hidden_sizes": [ip[f"{i}.to_k_ip.weight"][0] for i in idx],
        }
        self.hints: List[str] = []
        self.suffix = "_" + self.base

    def need(self, key: str) -> Shape:
        if key not in self.proj:
            fail(self.layout.path, f"image_proj.{key} is missing")
        return self.proj[key]

    def info(self, **fields) -> ModelInfo:
        fields.setdefault("base", self.base)
        return ModelInfo(params=self.params, hints=self.hints, **fields)


def _faceid_plus(c: _Context) -> ModelInfo:
    """MLP on the ArcFace embedding, refined by CLIP hidden states of the face crop."""
    proj0, proj2, norm = c.need("proj.0.weight"), c.need("proj.2.weight"), c.need("norm.weight")
    tokens = proj2[0] // norm[0]
    v2 = "v2" in c.names
    c.hints.append(
        "FaceID-Plus v1 and v2 are identical on disk; "
        + ("'v2' in the file name selects v2 (shortcut on)" if v2 else "no 'v2' in the file name, so v1 (no shortcut)")
    )
    c.params.update(
        id_embeddings_dim=proj0[1],
        hidden_dim=proj0[0],
        num_tokens=tokens,
        clip_embeddings_dim=c.need("perceiver_resampler.proj_in.weight")[1],
        perceiver=resampler_params(c.proj, "perceiver_resampler."),
        shortcut=v2,
    )
    return c.info(
        family="ip-adapter-faceid",
        variant=("ip-adapter-faceid-plusv2" if v2 else "ip-adapter-faceid-plus") + c.suffix,
        image_encoder="insightface+clip-vit-h" if c.params["clip_embeddings_dim"] == 1280 else "insightface+clip",
        encoder_output="face_embedding(normed)+hidden_states[-2] of the aligned face crop",
        tokens=tokens,
        projection="faceid-plus",
        lora=c.lora_rank is not None,
        lora_rank=c.lora_rank,
        face_model="buffalo_l",
    )


def _resampler(c: _Context) -> ModelInfo:
    """A Resampler on CLIP hidden states (plus, plus-face) or on the ArcFace embedding (InstantID, portrait-unnorm)."""
    rp = resampler_params(c.proj)
    c.params.update(rp)
    tokens = rp["num_queries"]
    if rp["embedding_dim"] == 512:
        if "portrait" in c.names:
            c.hints.append("InstantID and FaceID-portrait-unnorm share this layout; 'portrait' in the name selects portrait")
            return c.info(
                family="ip-adapter-faceid",
                variant="ip-adapter-faceid-portrait-unnorm" + c.suffix,
                image_encoder="insightface",
                encoder_output="face_embedding(raw)",
                tokens=tokens,
                projection="resampler",
                face_model="buffalo_l",
            )
        c.hints.append("the layout InstantID shares with FaceID-portrait-unnorm; no 'portrait' in the name, so InstantID")
        return c.info(
            family="instantid-adapter",
            variant="instantid-adapter" + c.suffix,
            image_encoder="insightface",
            encoder_output="face_embedding(raw)",
            tokens=tokens,
            projection="instantid-resampler",
            face_model="antelopev2",
        )
    enc = CLIP_VISION.get(rp["embedding_dim"], (None,))[0]
    if enc is None:
        fail(c.layout.path, f"Resampler input width {rp['embedding_dim']} matches no known CLIP vision encoder")
    face = "face" in c.names
    c.hints.append(
        "plus and plus-face share one layout; "
        + ("'face' in the file name selects plus-face" if face else "no 'face' in the file name, so plus")
    )
    vit_h = "_vit-h" if c.base == "sdxl" and enc == "clip-vit-h" else ""
    return c.info(
        family="ip-adapter",
        variant=("ip-adapter-plus-face" if face else "ip-adapter-plus") + c.suffix + vit_h,
        image_encoder=enc,
        encoder_output="hidden_states[-2]",
        tokens=tokens,
        projection="resampler",
    )


def _full_face_mlp(c: _Context) -> ModelInfo:
    """full-face: an MLP on every CLIP hidden state (257 tokens)."""
    proj0 = c.need("proj.0.weight")
    c.need("proj.2.weight")
    c.params.update(clip_embeddings_dim=proj0[1])
    enc = CLIP_VISION.get(proj0[1], (None,))[0]
    if enc is None:
        fail(c.layout.path, f"MLP input width {proj0[1]} matches no known CLIP vision encoder")
    return c.info(
        family="ip-adapter",
        variant="ip-adapter-full-face" + c.suffix,
        image_encoder=enc,
        encoder_output="hidden_states[-2]",
        tokens=257,
        projection="mlp",
    )


def _faceid_mlp(c: _Context) -> ModelInfo:
    """FaceID (with its LoRA) and FaceID-portrait (no LoRA, 16 tokens per face)."""
    proj0, proj2, norm = c.proj["proj.0.weight"], c.need("proj.2.weight"), c.proj["norm.weight"]
    tokens = proj2[0] // norm[0]
    c.params.update(id_embeddings_dim=proj0[1], hidden_dim=proj0[0], num_tokens=tokens)
    if c.lora_rank is None:
        c.hints.append("portrait and portrait-v11 share one layout (no LoRA, 16 tokens per face)")
        variant = "ip-adapter-faceid-portrait" + ("-v11" if "v11" in c.names else "") + c.suffix
    else:
        variant = "ip-adapter-faceid" + c.suffix
    return c.info(
        family="ip-adapter-faceid",
        variant=variant,
        image_encoder="insightface",
        encoder_output="face_embedding(normed)",
        tokens=tokens,
        projection="faceid-mlp",
        lora=c.lora_rank is not None,
        lora_rank=c.lora_rank,
        face_model="buffalo_l",
    )


def _linear(c: _Context) -> ModelInfo:
    """The standard projection of the CLIP image embedding: standard, light, vit-G, sdxl."""
    w = c.proj["proj.weight"]
    norm = c.need("norm.weight")
    C = c.context
    if norm[0] != C:
        fail(c.layout.path, f"image_proj.norm.weight has width {norm[0]}, the ip_adapter layers expect {C}")
    tokens, E = w[0] // C, w[1]
    enc = CLIP_BY_PROJECTION.get(E)
    if enc is None:
        fail(c.layout.path, f"linear projection input width {E} matches no known CLIP vision encoder")
    c.params.update(clip_embeddings_dim=E, num_tokens=tokens)
    if c.base == "sd15" and enc == "clip-vit-h":
        light = "light" in c.names
        c.hints.append(
            "standard and light share one layout; "
            + ("'light' in the file name selects light" if light else "no 'light' in the file name, so standard")
        )
        variant = "ip-adapter_sd15_light" + ("_v11" if "v11" in c.names else "") if light else "ip-adapter_sd15"
    elif c.base == "sd15":
        variant = "ip-adapter_sd15_vit-G"
    else:
        variant = "ip-adapter_sdxl" + ("_vit-h" if enc == "clip-vit-h" else "")
    return c.info(
        family="ip-adapter",
        variant=variant,
        image_encoder=enc,
        encoder_output="image_embeds",
        tokens=tokens,
        projection="linear",
    )


def detect_ip_adapter(layout: Layout, names: str) -> ModelInfo:
    """Which IP-Adapter, FaceID or InstantID adapter a file with ``image_proj``/``ip_adapter`` sections is."""
    c = _Context(layout, names)
    proj = c.proj
    if "perceiver_resampler.proj_in.weight" in proj:
        return _faceid_plus(c)
    if "latents" in proj:
        return _resampler(c)
    if "proj.3.weight" in proj:
        return _full_face_mlp(c)
    if "proj.0.weight" in proj and "norm.weight" in proj:
        return _faceid_mlp(c)
    if "proj.weight" in proj and len(proj["proj.weight"]) == 2:
        return _linear(c)
    sample = ", ".join(sorted(proj)[:4])
    fail(layout.path, f"unknown image_proj layout (keys: {sample}, …); not an official IP-Adapter projection")
