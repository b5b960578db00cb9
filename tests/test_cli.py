"""The command-line demo: trains, saves, reloads, reports; never leaves a half-written directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_lens_hierarchical import HierarchicalTopKSAE, load_sae
from sae_lens_hierarchical.cli import main


def test_demo_writes_loadable_sae_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "demo"
    main(["demo", "--output-dir", str(output), "--training-tokens", "20000", "--d-sae", "64", "--k", "8"])
    printed = capsys.readouterr().out
    assert "| k | L0 | FVU |" in printed
    assert {p.name for p in output.iterdir()} == {"sae", "per_k.md", "per_k.json", "per_k.png"}
    rows = json.loads((output / "per_k.json").read_text())
    assert [row["k"] for row in rows] == [1, 2, 4, 8]
    assert [row["l0"] for row in rows] == pytest.approx([1, 2, 4, 8])
    assert (output / "per_k.png").read_bytes().startswith(b"\x89PNG")
    sae = load_sae(output / "sae")
    assert isinstance(sae, HierarchicalTopKSAE)
    assert sae.cfg.k == 8
    assert [p.name for p in tmp_path.iterdir()] == ["demo"], "no scratch directory may be left behind"


def test_demo_refuses_to_overwrite_and_leaves_nothing_on_bad_settings(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["demo", "--output-dir", str(existing)])
    assert (existing / "keep.txt").read_text() == "precious"

    with pytest.raises(SystemExit, match=r"1..d_sae=64; got k=100"):
        main(["demo", "--output-dir", str(tmp_path / "bad"), "--d-sae", "64", "--k", "100"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
