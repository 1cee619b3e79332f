"""An SDXL text side as the WebUI 1.10.1 runs it, small: two text encoders on the real CLIP BPE
vocabulary behind ``sd_model.get_learned_conditioning``.

``TinyEncoder`` is the encoder itself (a token table and a causal mix, so a row depends on the
tokens before it, like CLIP); ``StandInTextModel`` adds the WebUI's prompt handling of
``sd_hijack_clip.TextConditionalModel`` (fragments by emphasis, 75-token chunks with start/end
tokens, BREAK, multipliers and the "Original" mean-restoring emphasis, chunks hstacked). With
``SD_WEBUI_ROOT`` set, ``prompt_stack.py`` puts the WebUI's real ``TextConditionalModel`` under
``TinyEncoder`` instead.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from clip_tokenizer import clip_tokenizer

opts = SimpleNamespace(emphasis="Original")  # the stand-in's options (the real stack uses modules.shared.opts)


class TinyEncoder:
    """``tokenize`` with CLIP's tokenizer; ``encode_with_transformers``: deterministic context-dependent rows."""

    def setup_encoder(self, width: int, seed: int, *, pooled: bool = False, id_pad=None):
        tok = clip_tokenizer()
        self.tokenizer = tok
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(tok), width, generator=g)
        self.mix = torch.randn(width, width, generator=g) / math.sqrt(width)
        self.width = width
        self.return_pooled = pooled
        self.comma_token = tok.convert_tokens_to_ids(",</w>")
        self.id_start, self.id_end = tok.bos_token_id, tok.eos_token_id
        self.id_pad = self.id_end if id_pad is None else id_pad
        self.chunk_length = 75

    def tokenize(self, texts):
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        tokens = torch.as_tensor(tokens)
        e = self.table[tokens]  # [B, 77, W]
        seen = e.cumsum(1) / torch.arange(1, e.shape[1] + 1).view(1, -1, 1)
        z = 1.0 + e + torch.tanh(seen @ self.mix)  # CLIP's hidden states do not average to 0 either
        if self.return_pooled:
            z.pooled = z[:, -1] @ self.mix
        return z


class PromptChunk:
    def __init__(self):
        self.tokens, self.multipliers, self.fixes = [], [], []


class StandInTextModel(TinyEncoder, torch.nn.Module):
    """The WebUI's prompt handling (see the module docstring) over ``TinyEncoder``."""

    def __init__(self, parser, width, seed, **kw):
        torch.nn.Module.__init__(self)
        self.parser = parser
        self.setup_encoder(width, seed, **kw)

    def tokenize_line(self, line):
        parsed = self.parser.parse_prompt_attention(line) if opts.emphasis != "None" else [[line, 1.0]]
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks, chunk = [], PromptChunk()
        count = 0

        def next_chunk(is_last=False):
            nonlocal chunk, count
            count += len(chunk.tokens) if is_last else self.chunk_length
            pad = self.chunk_length - len(chunk.tokens)
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end] * pad + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * pad + [1.0]
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            for token in tokens:
                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, count

    def process_texts(self, texts):
        cache, batch, count = {}, [], 0
        for line in texts:
            if line not in cache:
                cache[line], n = self.tokenize_line(line)
                count = max(count, n)
            batch.append(cache[line])
        return batch, count

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def forward(self, texts):
        batch, _ = self.process_texts(texts)
        zs = []
        for i in range(max(len(c) for c in batch)):
            chunk = [c[i] if i < len(c) else self.empty_chunk() for c in batch]
            zs.append(self.process_tokens([x.tokens for x in chunk], [x.multipliers for x in chunk]))
        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, batch_tokens, batch_multipliers):
        tokens = torch.asarray(batch_tokens)
        if self.id_end != self.id_pad:
            for row in range(len(batch_tokens)):
                tokens[row, batch_tokens[row].index(self.id_end) + 1:] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        if opts.emphasis in ("Original", "No norm"):
            mean = z.mean()
            z = z * torch.asarray(batch_multipliers).unsqueeze(-1)
            if opts.emphasis == "Original":
                z = z * (mean / z.mean())
        if pooled is not None:
            z.pooled = pooled
        return z


class SizeEmbedder:
    """Stands for the SDXL conditioner's size/crop embedders: no text, no ``tokenize``."""


class SDXLTextModel:
    """``sd_model`` as far as prompts go: ``conditioner.embedders`` and ``get_learned_conditioning``
    returning ``{"crossattn": [B, 77k, L+G], "vector": [B, G+4]}`` (columns CLIP-L first)."""

    def __init__(self, encoder_class, parser, widths=(8, 16)):
        clip_l = encoder_class(parser, widths[0], 1)
        clip_g = encoder_class(parser, widths[1], 2, pooled=True, id_pad=0)
        self.conditioner = SimpleNamespace(embedders=[clip_l, clip_g, SizeEmbedder()])
        self.encoded = []  # the texts of every encoder call

    def get_learned_conditioning(self, batch):
        self.encoded.append(list(batch))
        clip_l, clip_g = self.conditioner.embedders[:2]
        z_l = clip_l(batch)
        z_g, pooled = clip_g(batch)
        return {"crossattn": torch.cat([z_l, z_g], -1), "vector": torch.cat([pooled, torch.zeros(len(batch), 4)], -1)}


class SDXLRefinerTextModel(SDXLTextModel):
    """The SDXL refiner's text side: OpenCLIP-G only (its context is 1280 wide there)."""

    def __init__(self, encoder_class, parser, widths=(8, 16)):
        super().__init__(encoder_class, parser, widths)
        self.conditioner.embedders = self.conditioner.embedders[1:]

    def get_learned_conditioning(self, batch):
        self.encoded.append(list(batch))
        z_g, pooled = self.conditioner.embedders[0](batch)
        return {"crossattn": z_g, "vector": torch.cat([pooled, torch.zeros(len(batch), 4)], -1)}
