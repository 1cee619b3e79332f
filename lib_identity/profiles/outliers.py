"""Which pictures of a profile show someone else: faces far from the others.

Each face is compared with the element-wise median of the *other* pictures' normed ArcFace
embeddings (one face per picture), normed again: one stray picture cannot pull a median as it
would pull a mean, and leaving the face itself out keeps a few pictures of different people from
agreeing with a median made of themselves. A face whose cosine to it is below ``OUTLIER_COSINE``
is an outlier. Pictures of one person under real ArcFace models sit
well above that (about 0.5-0.8); different people sit near 0.

With fewer than ``MIN_PICTURES`` faces there is no majority to tell who the person is, and when
most faces are far from the median the pictures do not agree on anyone; in both cases nothing is
left out and the caller says so.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

OUTLIER_COSINE = 0.3
MIN_PICTURES = 3


def median_face(normed: np.ndarray) -> np.ndarray:
    """The normed element-wise median of ``[n, d]`` normed embeddings."""
    m = np.median(np.asarray(normed, dtype=np.float64), axis=0)
    norm = float(np.linalg.norm(m))
    return m / norm if norm > 0 else m


def cosines_to_median(normed: np.ndarray) -> np.ndarray:
    """Each face's cosine to the median face of the other pictures."""
    x = np.asarray(normed, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.array([float(x[i] @ median_face(np.delete(x, i, axis=0))) for i in range(len(x))])


def find_outliers(normed: Sequence, threshold: float = OUTLIER_COSINE) -> Tuple[List[Tuple[int, float]], str]:
    """``(outliers, note)``: ``[(index, cosine)]`` of the faces to leave out, and a sentence when
    none could be told apart (too few faces, or no majority); ``note`` is "" otherwise."""
    x = np.asarray(normed, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < MIN_PICTURES:
        return [], ""
    cos = cosines_to_median(x)
    far = [(i, float(c)) for i, c in enumerate(cos) if c < threshold]
    if len(far) * 2 >= len(cos):
        shown = ", ".join(f"{c:.2f}" for c in cos)
        return [], (f"the faces do not agree on one person (cosines to the median face of the others: {shown}); "
                    "no picture was left out: check that they all show the same person")
    return far, ""
