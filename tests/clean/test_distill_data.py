import json

import numpy as np
import pytest

from facetrain.clean.distill_data import read_teacher_embeddings, write_teacher_embeddings
from facetrain.data import open_dataset
from facetrain.embed import load_embedder
from facetrain.errors import DataError


def test_teacher_embeddings_in_dataset_order(noisy_data, trained_checkpoint, tmp_path):
    out = tmp_path / "teacher.npy"
    side = write_teacher_embeddings(trained_checkpoint, noisy_data.path, out, flip=True, batch_size=50, progress=False)
    arr, meta = read_teacher_embeddings(out)
    assert meta == json.loads(out.with_suffix(".json").read_text()) == side
    assert arr.shape == (len(noisy_data.labels), 64) and arr.dtype == np.float32
    assert meta["flip"] is True and meta["normalized"] is True and len(meta["teacher_sha256"]) == 64
    # independent recomputation for a few indices, in float64
    ds = open_dataset(noisy_data.path)
    emb = load_embedder(trained_checkpoint, device="cpu")
    for i in (0, 77, len(ds) - 1):
        a, b = emb.embed_flip(ds[i][0][None])
        ref = (a + b).astype(np.float64)
        ref /= np.linalg.norm(ref)
        np.testing.assert_allclose(arr[i], ref[0], atol=1e-5)
    half = tmp_path / "teacher16.npy"
    write_teacher_embeddings(trained_checkpoint, noisy_data.path, half, fp16=True, progress=False)
    arr16, _ = read_teacher_embeddings(half)
    assert arr16.dtype == np.float16
    with pytest.raises(DataError, match="already exists"):
        write_teacher_embeddings(trained_checkpoint, noisy_data.path, half, progress=False)
    assert not list(tmp_path.glob(".*tmp*"))
