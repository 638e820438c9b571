"""``facetrain embed``: inputs (folder, list, .rec, photos), outputs, resume after an interruption, bad images."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from facetrain.data.images import encode_image  # noqa: E402
from facetrain.embed import TorchEmbedder  # noqa: E402
from facetrain.embed_batch import embed_to_file, open_input  # noqa: E402
from facetrain.errors import DataError  # noqa: E402


class TinyNet(torch.nn.Module):
    """A real (small) embedding network: conv, pooling, linear; deterministic weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4, padding=2)  # 28x28: exportable 4x4 adaptive pooling
        self.fc = torch.nn.Linear(8 * 4 * 4, 16)

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(x.flatten(1))


class CountingEmbedder(TorchEmbedder):
    """TorchEmbedder that counts the faces it embeds."""

    def __init__(self) -> None:
        torch.manual_seed(1)
        super().__init__(TinyNet(), device="cpu", batch_size=4, name="tiny")
        self.seen = 0

    def embed(self, images):
        self.seen += len(images)
        return super().embed(images)


def _interrupt(shard: int) -> None:
    raise KeyboardInterrupt


def _faces(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """root/<identity>/<image>: 3 identities, 11 faces; returns (root, {relative path: (face, label)})."""
    root = tmp_path / "faces"
    faces = _faces(11)
    truth = {}
    for i, face in enumerate(faces):
        name = ["ann", "bob", "cy"][i % 3]
        rel = f"{name}/{i:02d}.png"
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode_image(face, ext=".png"))
        truth[rel] = (face, ["ann", "bob", "cy"].index(name))
    return root, truth


def _reference(truth: dict) -> tuple[list[str], np.ndarray]:
    """Embeddings computed directly (no pipeline), in float64 from the module, in sorted-path order."""
    ids = sorted(truth)
    torch.manual_seed(1)
    net = TinyNet().eval()
    x = torch.from_numpy(np.stack([truth[k][0] for k in ids]).astype(np.float64) / 127.5 - 1.0)
    with torch.no_grad():
        return ids, net(x.permute(0, 3, 1, 2).float()).double().numpy()


def test_folder_roundtrip_matches_direct_embedding(folder, tmp_path):
    root, truth = folder
    embedder = CountingEmbedder()
    summary = embed_to_file(embedder, root, tmp_path / "out.npz", batch_size=3, shard_size=4, workers=2)
    assert summary.n_items == summary.n_embeddings == 11 and summary.n_resumed == 0 and not summary.bad
    with np.load(tmp_path / "out.npz") as data:
        ids_ref, emb_ref = _reference(truth)
        assert data["ids"].tolist() == ids_ref
        assert data["labels"].tolist() == [truth[k][1] for k in ids_ref]
        np.testing.assert_allclose(data["embeddings"], emb_ref, rtol=1e-4, atol=1e-5)
        assert str(data["model"]) == embedder.identity
    assert not (tmp_path / "out.npz.partial").exists()
    assert embedder.seen == 11


def test_resume_after_interruption_skips_finished_shards(folder, tmp_path):
    root, truth = folder
    out = tmp_path / "out.npz"

    def interrupt_after_first_shard(shard: int) -> None:
        if shard == 0:
            raise KeyboardInterrupt  # what Ctrl-C / a kill between two shards leaves behind

    first = CountingEmbedder()
    with pytest.raises(KeyboardInterrupt):
        embed_to_file(first, root, out, batch_size=2, shard_size=4, on_shard=interrupt_after_first_shard)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "out.npz.partial").iterdir()) == ["manifest.json", "shard-000000.npz"]

    second = CountingEmbedder()
    summary = embed_to_file(second, root, out, batch_size=2, shard_size=4)
    assert summary.n_resumed == 4 and second.seen == 11 - 4
    with np.load(out) as data:
        ids_ref, emb_ref = _reference(truth)
        assert data["ids"].tolist() == ids_ref
        np.testing.assert_allclose(data["embeddings"], emb_ref, rtol=1e-4, atol=1e-5)


def test_resume_with_other_settings_is_refused(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "out.npz"
    with pytest.raises(KeyboardInterrupt):
        embed_to_file(CountingEmbedder(), root, out, shard_size=4, on_shard=_interrupt)
    with pytest.raises(DataError, match="shard_size differ.*--restart"):
        embed_to_file(CountingEmbedder(), root, out, shard_size=5)
    summary = embed_to_file(CountingEmbedder(), root, out, shard_size=5, restart=True)
    assert summary.n_resumed == 0 and summary.n_embeddings == 11
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        embed_to_file(CountingEmbedder(), root, out)


def test_bad_images_stop_the_run_or_are_listed_with_skip_bad(folder, tmp_path):
    root, truth = folder
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (root / "cy" / "big.png").write_bytes(encode_image(_faces(1)[0][:100, :90], ext=".png"))
    with pytest.raises(DataError) as info:
        embed_to_file(CountingEmbedder(), root, tmp_path / "a.npz", shard_size=4)
    assert "\n" not in str(info.value) and "--skip-bad" in str(info.value)
    summary = embed_to_file(CountingEmbedder(), root, tmp_path / "b.npz", shard_size=4, skip_bad=True)
    assert summary.n_items == 13 and summary.n_embeddings == 11
    assert sorted(b.split(":")[0] for b in summary.bad) == ["bob/broken.jpg", "cy/big.png"]
    assert any("90x100" in b and "--detector" in b for b in summary.bad)
    with np.load(tmp_path / "b.npz") as data:
        assert sorted(data["bad_ids"].tolist()) == ["bob/broken.jpg", "cy/big.png"]
        assert data["ids"].tolist() == sorted(truth)


def test_list_file_and_npy_output(folder, tmp_path):
    root, truth = folder
    listing = root / "list.txt"
    chosen = sorted(truth)[:5]
    listing.write_text("# path label\n" + "".join(f"{k}\t{100 + i}\n" for i, k in enumerate(chosen)))
    out = tmp_path / "emb.npy"
    summary = embed_to_file(CountingEmbedder(), listing, out, batch_size=2)
    assert summary.n_embeddings == 5
    emb = np.load(out)
    rows = [line.split("\t") for line in (tmp_path / "emb.ids.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == chosen and [int(r[1]) for r in rows] == [100, 101, 102, 103, 104]
    ids_ref, emb_ref = _reference({k: truth[k] for k in chosen})
    np.testing.assert_allclose(emb, emb_ref, rtol=1e-4, atol=1e-5)


def test_rec_input(tmp_path):
    from facetrain.data.recordio import write_rec_dataset

    faces = _faces(6, seed=2)
    labels = [0, 0, 1, 1, 2, 2]
    write_rec_dataset(tmp_path / "rec", [(encode_image(f, ext=".png"), lab) for f, lab in zip(faces, labels)])
    source = open_input(tmp_path / "rec")
    assert len(source) == 6
    out = tmp_path / "rec.npz"
    embed_to_file(CountingEmbedder(), tmp_path / "rec", out, batch_size=4, workers=2)
    with np.load(out) as data:
        assert data["labels"].tolist() == labels
        assert len(set(data["ids"].tolist())) == 6 and data["ids"][0].startswith("train.rec:")
        _, emb_ref = _reference({f"{i}": (f, 0) for i, f in enumerate(faces)})
        np.testing.assert_allclose(data["embeddings"], emb_ref, rtol=1e-4, atol=1e-5)


def test_parquet_output(folder, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed (Parquet output is optional)")
    root, truth = folder
    embed_to_file(CountingEmbedder(), root, tmp_path / "e.parquet")
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("id").to_pylist() == sorted(truth)
    assert np.asarray(table.column("embedding").to_pylist()).shape == (11, 16)


def test_cli_onnx_roundtrip_and_errors(folder, tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    from facetrain.export import export_onnx

    root, truth = folder
    torch.manual_seed(1)
    model = TinyNet().eval()
    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(model, onnx_path)
    out = tmp_path / "cli.npz"
    code, stdout, err = run_cli("embed", onnx_path, root, "--out", out, "--batch-size", "4", "--shard-size", "5")
    assert code == 0, err
    assert "11 embeddings of size 16" in stdout
    with np.load(out) as data:
        _, emb_ref = _reference(truth)
        np.testing.assert_allclose(data["embeddings"], emb_ref, rtol=1e-4, atol=1e-5)

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not onnx")
    code, _, err = run_cli("embed", junk, root, "--out", tmp_path / "x.npz")
    assert code == 1 and "not an ONNX model" in err and err.count("\n") == 1
    code, _, err = run_cli("embed", onnx_path, root, "--out", tmp_path / "x.csv")
    assert code == 1 and "unknown output format" in err
    code, _, err = run_cli("embed", onnx_path, tmp_path / "nowhere", "--out", tmp_path / "x.npz")
    assert code == 1 and "no such file or folder" in err


def test_onnx_with_wrong_input_shape_is_rejected(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from facetrain.embed_batch import load_batch_embedder
    from facetrain.errors import ModelError

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 112, 112, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])],
    )
    path = tmp_path / "nhwc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelError, match=r"expected \(batch, 3, H, W\)"):
        load_batch_embedder(path)


@pytest.mark.realdata
def test_raw_photos_with_detector(assets_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "hopper.jpg").write_bytes((assets_dir / "images" / "grace_hopper.jpg").read_bytes())
    (photos / "astronaut.png").write_bytes((assets_dir / "images" / "astronaut.png").read_bytes())
    try:
        summary = embed_to_file(CountingEmbedder(), photos, tmp_path / "p.npz", detector="retinaface", workers=1)
    except Exception as exc:  # the detector part may be unavailable in this checkout
        if "retinaface" in str(exc).lower() and "unknown" in str(exc).lower():
            pytest.skip(f"retinaface detector not available: {exc}")
        raise
    with np.load(tmp_path / "p.npz") as data:
        assert sorted(data["ids"].tolist()) == ["astronaut.png#0", "hopper.jpg#0"]
    assert summary.n_items == 2 and summary.n_embeddings == 2


def test_checkpoint_torchscript_and_onnx_give_the_same_embeddings(folder, tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    from facetrain.export import export_onnx, export_torchscript
    from facetrain.models import build_backbone, save_backbone

    root, truth = folder
    torch.manual_seed(2)
    model = build_backbone("mbf", embedding_size=32, blocks=(1, 1, 1, 1), scale=1).eval()
    models = {
        "ckpt": save_backbone(model, tmp_path / "m.pt", "mbf", embedding_size=32, blocks=(1, 1, 1, 1), scale=1),
        "script": export_torchscript(model, tmp_path / "m.torchscript"),
        "onnx": tmp_path / "m.onnx",
    }
    export_onnx(model, models["onnx"])
    results = {}
    for kind, path in models.items():
        out = tmp_path / f"{kind}.npz"
        code, _, err = run_cli("embed", path, root, "--out", out, "--device", "cpu", "--batch-size", "5")
        assert code == 0, err
        with np.load(out) as data:
            assert data["ids"].tolist() == sorted(truth)
            results[kind] = data["embeddings"].astype(np.float64)
    for kind in ("script", "onnx"):
        a, b = results["ckpt"], results[kind]
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.9999, kind


def test_resume_after_a_real_kill(tmp_path):
    """SIGKILL a real `facetrain embed` process once some shards are on disk; the re-run completes the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("onnxruntime")
    from facetrain.export import export_onnx

    root = tmp_path / "faces"
    root.mkdir()
    for i, face in enumerate(_faces(150, seed=3)):
        (root / f"{i:03d}.png").write_bytes(encode_image(face, ext=".png"))
    torch.manual_seed(1)
    export_onnx(TinyNet().eval(), tmp_path / "tiny.onnx")
    out = tmp_path / "out.npz"
    command = [sys.executable, "-m", "facetrain", "embed", str(tmp_path / "tiny.onnx"), str(root), "--out", str(out)]
    command += ["--batch-size", "1", "--shard-size", "1", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = tmp_path / "out.npz.partial"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if partial.is_dir() and len(list(partial.glob("shard-*.npz"))) >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    if process.returncode == 0:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    assert not out.exists()
    shards = sorted(partial.glob("shard-*.npz"))
    assert shards and all(np.load(p)["embeddings"].shape == (1, 16) for p in shards)  # no torn shard file

    summary = embed_to_file(tmp_path / "tiny.onnx", root, out, batch_size=1, shard_size=1, workers=1)
    assert 0 < summary.n_resumed < 150 and summary.n_embeddings == 150
    reference = embed_to_file(tmp_path / "tiny.onnx", root, tmp_path / "ref.npz", batch_size=16)
    assert reference.n_resumed == 0
    with np.load(out) as got, np.load(tmp_path / "ref.npz") as want:
        assert got["ids"].tolist() == want["ids"].tolist()
        np.testing.assert_allclose(got["embeddings"], want["embeddings"], rtol=1e-5, atol=1e-6)


def test_onnx_streams_run_batches_concurrently_in_input_order(folder, tmp_path):
    """On CPU the cores are split into streams (one session, concurrent runs, 1 intra-op thread each); the output
    is the same rows in the same order as one stream, and an interrupted multi-stream run resumes."""
    pytest.importorskip("onnxruntime")
    from facetrain.embed_batch import PipelineOnnxEmbedder
    from facetrain.errors import ModelError
    from facetrain.export import export_onnx

    root, truth = folder
    torch.manual_seed(1)
    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(TinyNet().eval(), onnx_path)
    cpu = ["CPUExecutionProvider"]
    parallel = PipelineOnnxEmbedder(onnx_path, batch_size=2, providers=cpu, threads=2)
    assert parallel.streams == 2 and parallel.session.get_session_options().intra_op_num_threads == 1
    single = PipelineOnnxEmbedder(onnx_path, batch_size=2, providers=cpu, threads=2, streams=1)
    assert single.streams == 1 and single.session.get_session_options().intra_op_num_threads == 2
    assert PipelineOnnxEmbedder(onnx_path, providers=cpu, threads=3, streams=8).streams == 3  # never above threads
    with pytest.raises(ModelError, match="streams must be >= 1"):
        PipelineOnnxEmbedder(onnx_path, providers=cpu, streams=0)

    ids_ref, emb_ref = _reference(truth)
    outputs = {}
    for name, embedder in (("parallel", parallel), ("single", single)):
        out = tmp_path / f"{name}.npz"
        embed_to_file(embedder, root, out, batch_size=2, shard_size=3, workers=1)
        with np.load(out) as data:
            assert data["ids"].tolist() == ids_ref
            np.testing.assert_allclose(data["embeddings"], emb_ref, rtol=1e-4, atol=1e-5)
            outputs[name] = data["embeddings"]
    np.testing.assert_allclose(outputs["parallel"], outputs["single"], rtol=1e-6, atol=1e-6)

    out = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        embed_to_file(parallel, root, out, batch_size=2, shard_size=3, on_shard=_interrupt)
    summary = embed_to_file(parallel, root, out, batch_size=2, shard_size=3)
    assert summary.n_resumed == 3
    with np.load(out) as data:
        assert data["ids"].tolist() == ids_ref
        np.testing.assert_allclose(data["embeddings"], outputs["parallel"], rtol=1e-6, atol=1e-6)


def test_native_prelu_model_is_decomposed_in_memory_with_the_same_embeddings(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    from facetrain.embed_batch import PipelineOnnxEmbedder
    from facetrain.export import export_onnx
    from facetrain.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("mbf", embedding_size=32, blocks=(1, 1, 1, 1), scale=1).eval()
    path = tmp_path / "native.onnx"
    export_onnx(model, path, prelu="native")
    assert any(node.op_type == "PRelu" for node in onnx.load(str(path)).graph.node)
    faces = _faces(5, seed=2)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = ((faces.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()
    expected = plain.run(None, {"data": x})[0]
    before = path.read_bytes()
    embedder = PipelineOnnxEmbedder(path, providers=["CPUExecutionProvider"], threads=1)
    np.testing.assert_allclose(embedder.embed(faces), expected, rtol=1e-5, atol=1e-5)
    assert path.read_bytes() == before  # the rewrite happens in memory; the file on disk is untouched


def test_warm_up_runs_full_batches_on_every_stream(tmp_path):
    pytest.importorskip("onnxruntime")
    from facetrain.embed_batch import PipelineOnnxEmbedder
    from facetrain.export import export_onnx

    torch.manual_seed(1)
    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(TinyNet().eval(), onnx_path)
    embedder = PipelineOnnxEmbedder(onnx_path, batch_size=3, providers=["CPUExecutionProvider"], threads=2)
    calls = []
    original = embedder._embed_batch
    embedder._embed_batch = lambda batch: calls.append(batch.shape) or original(batch)
    embedder.warm_up(rounds=2)
    assert calls == [(3, 112, 112, 3)] * 2 * embedder.streams and embedder.streams == 2
