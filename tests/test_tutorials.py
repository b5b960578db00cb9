"""The tutorials run top to bottom (small settings) on the embedded Gemma-3-270M."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


@pytest.mark.slow
def test_tutorials_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUTORIAL_TRAINING_TOKENS", "40000")
    monkeypatch.setenv("TUTORIAL_EVAL_TOKENS", "4000")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    for name in ("01_train_with_sae_lens_runner.ipynb", "02_choose_k_at_inference.ipynb"):
        notebook = nbformat.read(TUTORIALS / name, as_version=4)
        client = NotebookClient(
            notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()
        errors = [
            output
            for cell in notebook.cells
            if cell.cell_type == "code"
            for output in cell.get("outputs", [])
            if output.get("output_type") == "error"
        ]
        assert not errors, f"{name}: {errors}"
    assert (tmp_path / "output" / "htopk-gemma-3-270m" / "sae" / "cfg.json").is_file()
    assert (tmp_path / "output" / "htopk-gemma-3-270m" / "per_k.png").is_file()
    assert os.environ["TUTORIAL_TRAINING_TOKENS"] == "40000"
