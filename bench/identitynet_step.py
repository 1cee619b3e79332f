"""Per-step cost of IdentityNet as a ratio to the bare SDXL UNet step, measured in one run on CPU.

    python bench/identitynet_step.py [--channels 64] [--latent 32] [--repeats 5] [--steps 2]

One step is one UNet call with a cond and an uncond row (CFG). The UNet has SDXL's block
structure (transformer depth 0/2/10 per level, 10 in the middle, 64-channel heads, linear
projections, context 2048, 77 text tokens), built from the WebUI's ldm classes with the
WebUI's "sdp" attention (torch SDPA, installed at class level as the WebUI does), at a reduced
base width (SDXL: 320) and latent size, so that it runs on a small CPU. IdentityNet is built
from the same classes with the same structure (16 face tokens as context, a keypoint hint of 8x
the latent size), and its 10 residuals are added to the UNet's skips and middle block by
forward hooks (a stand-in for the extension's control hooks). Printed:

* the bare UNet step, IdentityNet alone, and UNet + IdentityNet, with the ratio to the bare step;
* the same ratio in multiply-accumulates at full SDXL size (width 320, 1024x1024, latent 128),
  counted by torch's FlopCounterMode on the meta device (no memory, no time): what the timing
  ratio tends to where convolutions and attention dominate as they do at full size.

Configurations are interleaved round by round; each timing is the fastest of ``--repeats`` rounds
(the median is printed too). One CPU thread by default, the steadiest on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from lib_identity.models.identitynet import IdentityNet, host_classes  # noqa: E402
from lib_identity.models.identitynet_config import IdentityNetConfig  # noqa: E402
from unet_models import SDXL, build_ldm_unet, randomize_  # noqa: E402

CONTEXT, ADM, FACE_TOKENS, TEXT_TOKENS = 2048, 2816, 16, 77


def webui_sdp_forward(self, x, context=None, mask=None, **kwargs):
    """The WebUI's "sdp" cross-attention optimisation (same math), written for this benchmark."""
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, inner = q.shape
    q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out[1](self.to_out[0](out.transpose(1, 2).reshape(b, n, inner)))


def sdxl_config(channels: int) -> IdentityNetConfig:
    """IdentityNet's official structure (config.json of InstantID) at base width ``channels``."""
    return IdentityNetConfig(in_channels=4, model_channels=channels, channel_mult=(1, 2, 4), num_res_blocks=2,
                             transformer_depth=(0, 2, 10), middle_depth=10,
                             heads=tuple(channels * m // 64 for m in (1, 2, 4)), context_dim=CONTEXT,
                             adm_in_channels=ADM, hint_channels=3, hint_block_channels=(16, 32, 96, 256))


def build(channels: int, device=None):
    unet = build_ldm_unet(SDXL, model_channels=channels, context_dim=CONTEXT, head_channels=64, device=device)
    with torch.device(device or "cpu"):
        net = IdentityNet(sdxl_config(channels), host_classes(unet))
    if device is None:
        randomize_(unet, seed=0)
        randomize_(net, seed=1)
    return unet.eval(), net.eval()


class Residuals:
    """Adds IdentityNet's residuals to the UNet: skips at each output block's input, middle after the middle block."""

    def __init__(self, unet):
        self.residuals = None
        self.handles = [unet.middle_block.register_forward_hook(self._middle)]
        for j, block in enumerate(unet.output_blocks):
            self.handles.append(block.register_forward_pre_hook(self._skip(len(unet.output_blocks) - 1 - j)))

    def _middle(self, module, args, output):
        return output + self.residuals[-1] if self.residuals is not None else output

    def _skip(self, index):
        def hook(module, args):
            if self.residuals is None:
                return None
            h, rest = args[0], args[1:]
            r = self.residuals[index]
            return (torch.cat([h[:, :-r.shape[1]], h[:, -r.shape[1]:] + r], dim=1),) + rest
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def full_size_macs():
    """Multiply-accumulates of one CFG step at 1024x1024: bare UNet, IdentityNet (meta device, nothing allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, net = build(320, device="meta")
    with torch.device("meta"):
        x, t = torch.randn(2, 4, 128, 128), torch.full((2,), 500.0)
        hint, text = torch.rand(2, 3, 1024, 1024), torch.randn(2, TEXT_TOKENS, CONTEXT)
        face, y = torch.randn(2, FACE_TOKENS, CONTEXT), torch.randn(2, ADM)
    counts = []
    for fn in (lambda: unet(x, t, context=text), lambda: net(x, hint, t, face, y)):
        with FlopCounterMode(display=False) as counter:
            fn()
        counts.append(counter.get_total_flops() / 2)
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=64, help="base width (SDXL: 320); a multiple of 64")
    ap.add_argument("--latent", type=int, default=32, help="latent height and width (pixels: 8x)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each timing is the fastest of them")
    ap.add_argument("--steps", type=int, default=2, help="steps per round and configuration")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.modules.attention import CrossAttention

    CrossAttention.forward = webui_sdp_forward  # what the WebUI's apply_optimizations does
    unet, net = build(args.channels)
    g = torch.Generator().manual_seed(0)
    n = args.latent
    x, t = torch.randn(2, 4, n, n, generator=g), torch.full((2,), 500.0)
    text = torch.randn(2, TEXT_TOKENS, CONTEXT, generator=g)
    face, y = torch.randn(2, FACE_TOKENS, CONTEXT, generator=g), torch.randn(2, ADM, generator=g)
    hint = torch.rand(2, 3, 8 * n, 8 * n, generator=g)
    adder = Residuals(unet)

    def controlled():
        adder.residuals = net(x, hint, t, face, y)
        try:
            return unet(x, t, context=text)
        finally:
            adder.residuals = None

    configs = {"UNet bare": lambda: unet(x, t, context=text), "IdentityNet alone": lambda: net(x, hint, t, face, y),
               "UNet + IdentityNet": controlled}
    samples = {name: [] for name in configs}
    with torch.no_grad():
        changed = (controlled() - unet(x, t, context=text)).abs().max().item()
        for fn in configs.values():  # warm-up: the first calls allocate
            fn()
        for _ in range(args.repeats):
            for name, fn in configs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                samples[name].append((time.perf_counter() - start) / args.steps)
        macs = full_size_macs()
    adder.remove()

    best = {k: min(v) for k, v in samples.items()}
    med = {k: statistics.median(v) for k, v in samples.items()}
    params = sum(p.numel() for p in net.parameters()) / 1e6, sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SDXL layout at base width {args.channels} "
          f"(SDXL: 320), latent {n}x{n} ({8 * n}x{8 * n} px), batch 2 (cond + uncond), {TEXT_TOKENS} text tokens, "
          f"{FACE_TOKENS} face tokens; IdentityNet {params[0]:.1f} M parameters, UNet {params[1]:.1f} M; "
          f"{args.repeats} rounds x {args.steps} steps")
    print(f"{'configuration':22s} {'best ms':>9s} {'ratio':>7s} {'median ms':>10s} {'ratio':>7s}")
    for name in configs:
        print(f"{name:22s} {1000 * best[name]:9.1f} {best[name] / best['UNet bare']:7.3f} "
              f"{1000 * med[name]:10.1f} {med[name] / med['UNet bare']:7.3f}")
    print(f"sum of the parts (bare + IdentityNet alone) / bare: {(best['UNet bare'] + best['IdentityNet alone']) / best['UNet bare']:.3f} "
          f"(best), {(med['UNet bare'] + med['IdentityNet alone']) / med['UNet bare']:.3f} (median)")
    print(f"the residuals change the UNet output (max |difference| {changed:.3g})")
    print(f"full size (width 320, 1024x1024, batch 2), multiply-accumulates: UNet {macs[0] / 1e12:.2f} T, "
          f"IdentityNet {macs[1] / 1e12:.2f} T; UNet + IdentityNet = {(macs[0] + macs[1]) / macs[0]:.3f}x the bare step")


if __name__ == "__main__":
    main()
