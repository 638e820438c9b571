"""Real faces (shared assets): the SFace ONNX recogniser through OnnxEmbedder and `facetrain eval folder`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facetrain.data.images import read_image_file

pytestmark = pytest.mark.realdata
SFACE = "models/face_recognition_sface_2021dec_int8bq.onnx"


def _crops(assets_dir):
    return {p.stem: p for p in (assets_dir / "aligned112").rglob("*.png")}


def test_sface_scores_match_reference_pairs(assets_dir):
    pytest.importorskip("onnxruntime")
    from facetrain.embed import OnnxEmbedder

    embedder = OnnxEmbedder(assets_dir / SFACE, input_mean=0.0, input_std=1.0)  # SFace normalizes inside its graph
    assert embedder.embedding_size == 128 and embedder.fixed_batch == 1
    pairs = json.loads((assets_dir / "annotations.json").read_text())["verification_pairs"]
    crops = _crops(assets_dir)
    names = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    emb = embedder.embed(np.stack([read_image_file(crops[n]) for n in names]))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = {n: i for i, n in enumerate(names)}
    genuine, impostor = [], []
    for p in pairs:
        cos = float(emb[index[p["a"]]] @ emb[index[p["b"]]])
        assert cos == pytest.approx(p["sface_cos"], abs=0.03), p
        (genuine if p["same"] else impostor).append(cos)
    assert min(genuine) > max(impostor)


def test_cli_folder_on_labelled_crops(assets_dir, tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    root = tmp_path / "people"
    for identity in ("barack_obama", "joe_biden", "grace_hopper", "eileen_collins"):
        (root / identity).mkdir(parents=True)
        for src in (assets_dir / "aligned112" / identity).glob("*.png"):
            (root / identity / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "r.json"
    code, text, err = run_cli("eval", "folder", assets_dir / SFACE, root, "--input-mean", "0", "--input-std", "1",
                              "--far", "0.1", "--json", out)  # fmt: skip
    assert code == 0, err
    res = json.loads(out.read_text())["results"]
    assert res["n_pairs"] == 15 and res["n_genuine"] == 3 and res["n_probes"] == 3
    assert res["rank1"] == 1.0 and res["eer"] == 0.0 and res["accuracy_mean"] > 0.9
