"""What likeness costs per generated image, on the CPU, with the test suite's small ONNX face pack.

    .venv/bin/python bench/likeness_cost.py [--sizes 512,768,1024] [--repeats 7]

Likeness analyses every output image once (detection, then the recognizer on each face found)
and compares the faces with the unit's reference, whose analysis is cached from the unit's own
run. This script runs exactly that path (``likeness.LikenessRun.measure_image``, the real
insightface code) on insightface's group photo (six faces) scaled to each output size, and on a
flat picture of the same size (no face: detection runs again at 320 and 160 before giving up).
Printed per size: milliseconds per image (fastest and median of ``--repeats``), the faces found,
the analyses counted per image (``analysis_count``), which must be 1, and the ratio of the
likeness path to one bare ``analyse_faces`` call on the same image (the fastest of each,
interleaved): what likeness adds beyond the one analysis.

The test pack's detector and recognizer are tiny graphs with SCRFD's and ArcFace's signatures,
so the numbers are the extension's and insightface's own work around the models (picture
conversion, content digest, detector pre/post-processing, alignment, cosine), not the cost of
buffalo_l's SCRFD-10GF detector and ResNet-50 recognizer, which add their own inference time
on top (on a GPU with onnxruntime-gpu, or on the CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import face_models as fm  # noqa: E402
from PIL import Image  # noqa: E402

from lib_identity import likeness as L  # noqa: E402
from lib_identity.encoders import faces  # noqa: E402


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return min(times), statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,768,1024", help="long sides of the output images")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    pack = fm.write_pack(os.path.join(tempfile.mkdtemp(), "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    target = L.Target(1, pack, (t1,), 2)
    run = L.LikenessRun([target])
    target.reference()  # the unit's own run analysed its picture: cached before the first image
    faces.pack_models(pack)  # the sessions are opened once per process, not per image

    print(f"likeness per output image, CPU (onnxruntime), test ONNX pack, {args.repeats} repeats")
    print(f"{'size':>11} | {'picture':<9} | {'faces':>5} | {'analyses':>8} | {'ms fastest':>10} | {'ms median':>9} | "
          f"{'ratio to one analysis':>21}")
    for long_side in (int(s) for s in args.sizes.split(",")):
        scale = long_side / max(t1.size)
        size = (round(t1.width * scale), round(t1.height * scale))
        for label, image in (("6 faces", fm.coarse_noise(t1.resize(size, Image.BICUBIC))),
                             ("no face", Image.new("RGB", size, (128, 128, 128)))):
            before = faces.analysis_count()
            measured = run.measure_image(image, "warm-up")
            per_image = faces.analysis_count() - before
            times, bare = [], []
            for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
                times.append(timed(lambda: run.measure_image(image, "bench"), 1)[0])
                bare.append(timed(lambda: faces.analyse_faces(image, pack, cache=faces.FaceCache(0)), 1)[0])
            fastest, median = min(times), statistics.median(times)
            print(f"{size[0]:>5}x{size[1]:<5} | {label:<9} | {measured[1].faces:>5} | {per_image:>8} | "
                  f"{fastest:>10.1f} | {median:>9.1f} | {fastest / min(bare):>21.2f}")


if __name__ == "__main__":
    main()
