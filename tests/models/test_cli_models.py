"""``facetrain models list`` / ``facetrain models info`` in-process."""

from __future__ import annotations


def test_models_list(run_cli):
    code, out, err = run_cli("models", "list")
    assert code == 0, err
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[1:]}
    assert "iresnet50" in rows and "r50" not in rows
    assert abs(rows["iresnet50"] - 43.59) < 0.01  # arcface_torch r50: 43.59 M parameters at D=512
    code, out, _ = run_cli("models", "list", "--aliases")
    assert code == 0 and any(line.startswith("r50 ") for line in out.splitlines())


def test_models_info_counts_flops(run_cli):
    code, out, err = run_cli("models", "info", "mbf", "--embedding-size", "128")
    assert code == 0, err
    assert "mobilefacenet" in out and "embedding size  128" in out
    gflops = float(next(line for line in out.splitlines() if line.startswith("GFLOPs")).split()[1])
    assert 0.8 < gflops < 1.0  # arcface_torch quotes 0.45 G multiply-adds for mbf


def test_models_info_unknown_name(run_cli):
    code, _, err = run_cli("models", "info", "r5")
    assert code == 1 and "Did you mean 'r50'" in err and len(err.strip().splitlines()) == 1


def test_docs_table_is_generated():
    """docs/models.md holds the rows scripts/model_table.py generates (checked for two cheap models)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("model_table", root / "scripts" / "model_table.py")
    model_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_table)
    doc = (root / "docs" / "models.md").read_text()
    table = model_table.make_table(["iresnet18", "mobilefacenet"])
    for row in table.splitlines()[2:]:
        assert row in doc, f"docs/models.md is stale: run python scripts/model_table.py --write ({row})"
